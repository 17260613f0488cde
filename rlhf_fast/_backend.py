"""Backend selection: ``"auto" | "triton" | "native" | "torch"``.

auto: CUDA tensors -> the op's CUDA kernel of ``rlhf_fast._C`` where it has one and it was built (GAE),
else Triton (torch if Triton is missing); CPU tensors -> native C++ when ``rlhf_fast._C`` is built, else torch. Triton on CPU tensors is allowed only under
``TRITON_INTERPRET=1`` (how CI exercises the kernels without a GPU). Under ``torch.compile`` auto picks
torch: the reference is plain tensor code that dynamo traces (``fullgraph=True`` works) and Inductor fuses,
while the native and Triton launchers are opaque calls that would break the graph.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "triton", "native", "torch")


@functools.lru_cache(maxsize=None)
def native_module():
    """The compiled extension, or None (warned about once)."""
    try:
        from rlhf_fast import _C  # noqa: PLC0415
    except ImportError as err:
        warnings.warn(f"rlhf_fast._C is not built ({err}); CPU ops use the torch backend. "
                      "Build it with `pip install -e .` or `python setup.py build_ext --inplace`.",
                      RuntimeWarning, stacklevel=3)
        return None
    return _C


def native_available() -> bool:
    return native_module() is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_available(device: torch.device | str | None = None) -> bool:
    """Triton can run kernels on ``device`` (CUDA, or anything under the interpreter)."""
    if not _triton_importable():
        return False
    if triton_interpreting():
        return True
    dev = torch.device(device) if device is not None else None
    return torch.cuda.is_available() and (dev is None or dev.type == "cuda")


def native_cuda_available(function: str | None) -> bool:
    """``rlhf_fast._C`` was built with CUDA and has the CUDA kernel ``function``."""
    return function is not None and hasattr(native_module() or object(), function)


def resolve_backend(backend: str, tensor: torch.Tensor, native_cuda: str | None = None) -> str:
    """Pick the concrete backend for an op whose main input is ``tensor``. ``native_cuda`` names the op's CUDA
    kernel in ``rlhf_fast._C`` (csrc/cuda/) where it is the fastest path on CUDA tensors: "native" then also
    runs on CUDA tensors, and auto picks it there when the extension was built with it."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    dev = tensor.device
    if backend == "auto":
        if torch.compiler.is_compiling():
            return "torch"
        if dev.type == "cuda":
            if native_cuda_available(native_cuda):
                return "native"
            return "triton" if triton_available(dev) else "torch"
        if dev.type == "cpu" and native_available():
            return "native"
        return "torch"
    if backend == "triton" and not triton_available(dev):
        raise RuntimeError(f"backend='triton' needs triton and a CUDA tensor (or TRITON_INTERPRET=1); "
                           f"got a tensor on {dev}")
    if backend == "native":
        if dev.type == "cuda" and native_cuda_available(native_cuda):
            return backend
        if dev.type != "cpu":
            raise RuntimeError(f"backend='native' runs on CPU tensors{' (and CUDA ones for this op when _C is built with CUDA)' if native_cuda else ''}; got a tensor on {dev}")
        if not native_available():
            raise RuntimeError("backend='native' needs the compiled extension rlhf_fast._C")
    return backend
