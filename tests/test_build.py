"""The package layout and the native build."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import rlhf_fast

ROOT = Path(__file__).resolve().parents[1]


def test_native_extension_built_when_required():
    if os.environ.get("RLHF_FAST_REQUIRE_NATIVE") != "1":
        pytest.skip("RLHF_FAST_REQUIRE_NATIVE is not set")
    assert rlhf_fast.native_available(), "rlhf_fast._C failed to build or import"


def test_kernels_ship_inside_the_package_not_top_level(tmp_path):
    code = ("import importlib.util, rlhf_fast.kernels as k; "
            "print(k.__name__, importlib.util.find_spec('kernels') is None)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["rlhf_fast.kernels", "True"]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("source", sorted((ROOT / "csrc" / "cuda").glob("*.cu")), ids=lambda p: p.name)
def test_cuda_sources_compile(source, tmp_path):
    """Without a CUDA torch the .cu files are not built into _C; compile them anyway so they cannot rot."""
    cmd = ["nvcc", "-std=c++17", "-O3", "-arch=sm_90", "-c", str(source), "-o", str(tmp_path / "k.o")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
