"""The static kernel report (``python -m benchmarks kernels --check``) with the pinned triton and with triton 3.6
(the GPU machines' version; its wheel alone, installed once into .venv/triton36), and scripts/gpu_check.sh on a
machine without a GPU. Real compiles (ptxas, cuobjdump from the triton wheel), no GPU needed."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from benchmarks import kernels as report

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRITON36 = ROOT / ".venv" / "triton36"


def _run_report(tmp_path, archs, extra_env=None):
    out = tmp_path / "kernels.json"
    env = {**os.environ, **(extra_env or {})}
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run([sys.executable, "-m", "benchmarks", "kernels", "--check", "--arch", archs, "--json", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(out.read_text())


def _assert_complete(result, archs):
    """Every Spec compiled for every arch, the lm_head's bf16 and tf32 dots on tensor cores."""
    rows = result["rows"]
    assert not report.uncovered()
    for spec in report.specs():
        for cc in archs:
            assert any(r["kernel"] == f"{spec.module}.{spec.kernel}" and r["arch"] == f"sm_{cc}" for r in rows)
    for r in rows:
        assert "error" not in r or r["error"].startswith("skipped"), r
        if r["dot"] and r["dtype"] in ("bf16", "tf32"):
            assert r[report.TENSOR_CORE[int(r["arch"][3:])]] > 0, r


@pytest.mark.slow
def test_report_passes_check_with_pinned_triton(tmp_path):
    _assert_complete(_run_report(tmp_path, "80,90"), (80, 90))


def _triton36() -> pathlib.Path:
    """triton 3.6's wheel, without dependencies, in .venv/triton36 (installed on first use; it imports
    beside torch 2.13 for compile-only use)."""
    if not (TRITON36 / "triton" / "__init__.py").exists():
        p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(TRITON36),
                            "triton==3.6.0"], capture_output=True, text=True, timeout=900)
        if p.returncode:
            pytest.skip(f"cannot install triton 3.6.0 (no package index?): {p.stderr[-500:]}")
    return TRITON36


@pytest.mark.slow
def test_report_passes_check_with_triton_3_6(tmp_path):
    """The GPU machines (H100/H200) carry triton 3.6: sm_90 with it."""
    result = _run_report(tmp_path, "90", {"PYTHONPATH": f"{_triton36()}{os.pathsep}{ROOT}"})
    assert result["meta"]["triton"] == "3.6.0"
    _assert_complete(result, (90,))


def _row(**kw):
    base = {"kernel": "k", "dtype": "bf16", "arch": "sm_90", "dot": False, "shared_limit": report.SHARED_LIMIT[90],
            "regs": 100, "stack": 0, "LDL": 0, "STL": 0, "HGMMA": 0, "HMMA": 0, "shared": 0}
    return {**base, **kw}


def test_check_rules():
    assert report.problems(_row()) == []
    assert "spills" in report.problems(_row(stack=8, LDL=1))[0]
    assert report.problems(_row(dtype="fp32", stack=8, LDL=1)) == []          # fp32: reported, not failed
    assert "shared memory" in report.problems(_row(shared=228 * 1024))[0]
    assert "tensor-core" in report.problems(_row(dot=True))[0]
    assert report.problems(_row(dot=True, HGMMA=4)) == []
    assert "compile error" in report.problems({"kernel": "k", "error": "CompilationError: x"})[0]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="there is a GPU: run scripts/gpu_check.sh itself")
def test_gpu_check_without_a_gpu_stops_at_the_first_cuda_call(tmp_path):
    """No GPU: the environment step runs and writes env.txt, then exit 2 with a message naming the missing GPU,
    before the build."""
    env = {**os.environ, "PYTHON": sys.executable}
    p = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "out")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "no CUDA GPU visible to torch" in p.stderr
    assert "torch" in (tmp_path / "out" / "env.txt").read_text()
    assert not (tmp_path / "out" / "build.log").exists()
