"""Builds rlhf_fast._C from csrc/: C++ (OpenMP) always, CUDA sources too when torch has CUDA and nvcc exists.

Set RLHF_FAST_NO_NATIVE=1 to skip the extension (the package then falls back to the torch backend).
"""
import glob
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("RLHF_FAST_NO_NATIVE") != "1":
    import torch
    from torch.utils import cpp_extension

    # The CPU kernels' SIMD width follows the target: the build machine's own by default (an editable build
    # runs where it is built); RLHF_FAST_MARCH=x86-64-v2 (or any -march value) for a portable build.
    march = os.environ.get("RLHF_FAST_MARCH", "native")
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp", f"-march={march}", "-ffp-contract=fast"]
    sources = sorted(glob.glob("csrc/*.cpp"))
    headers = sorted(glob.glob("csrc/*.h"))  # a changed header rebuilds the extension
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        ext = cpp_extension.CUDAExtension(
            "rlhf_fast._C", sources,
            extra_compile_args={"cxx": cxx_flags + ["-DRLHF_FAST_WITH_CUDA"],
                                "nvcc": ["-O3", "-std=c++17", "-DRLHF_FAST_WITH_CUDA"]},
            extra_link_args=["-fopenmp"], depends=headers)
    else:
        ext = cpp_extension.CppExtension(
            "rlhf_fast._C", sources, extra_compile_args=cxx_flags, extra_link_args=["-fopenmp"], depends=headers)
    ext_modules = [ext]
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=False)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
