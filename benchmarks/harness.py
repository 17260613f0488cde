"""Timing and memory measurement shared by every benchmark.

A benchmark module ``benchmarks/<name>.py`` defines ``cases(quick: bool, device: str) -> list[Case]``.
Each :class:`Case` builds its inputs once and names the implementations to compare
(``rlhf_fast`` for ours, the peer's name otherwise: ``trl``, ``verl-loop``, ``openrlhf-eager``, ...).
Rows are ``{"bench", "case", "impl", "device", "median_ms", "p20_ms", "p80_ms", "reps", "peak_mb", ...}``.

peak_mb is what an implementation allocates beyond its inputs and the outputs it returns:
on CPU, peak RSS in a fresh process (``python -m benchmarks.memprobe``) over the RSS after
building the inputs, minus the returned tensors; on CUDA, the allocator's peak over the same baseline.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import torch


@dataclasses.dataclass
class Case:
    name: str
    make_inputs: Callable[[], dict]
    impls: dict[str, Callable[[dict], Any]]
    bytes_moved: int | None = None      # minimal bytes read + written by the op (physical limit)
    flops: float | None = None          # FLOPs of the op (compute limit)
    tokens: int | None = None           # tokens processed per call, for tokens/s
    min_reps: int = 5
    budget_s: float = 2.0               # time budget per (case, impl)
    memory: bool = True                 # measure peak_mb (fresh process on CPU)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def tensors_in(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in tensors_in(o)]
    return []


def nbytes(obj) -> int:
    return sum(t.numel() * t.element_size() for t in tensors_in(obj))


def time_impl(fn: Callable[[dict], Any], inputs: dict, device: str, min_reps: int, budget_s: float) -> dict:
    """Median and 20th/80th percentile wall time of ``fn(inputs)`` after one warm-up call."""
    fn(inputs)
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < 200):
        t0 = time.perf_counter()
        fn(inputs)
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    qs = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    return {"median_ms": statistics.median(times), "p20_ms": qs[1], "p80_ms": qs[7], "reps": len(times)}


def peak_mb_cuda(fn: Callable[[dict], Any], inputs: dict) -> float:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn(inputs)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base - nbytes(out)
    return max(peak, 0) / 2**20


def peak_mb_fresh_process(bench: str, case: str, impl: str, device: str, quick: bool) -> float | None:
    cmd = [sys.executable, "-m", "benchmarks.memprobe", bench, case, impl, "--device", device]
    if quick:
        cmd.append("--quick")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        print(f"  memprobe failed for {bench}/{case}/{impl}: {res.stderr.strip()[-500:]}", file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_mb"]


def run_cases(bench: str, cases: list[Case], device: str, quick: bool) -> list[dict]:
    rows = []
    for case in cases:
        inputs = case.make_inputs()
        for impl, fn in case.impls.items():
            timing = time_impl(fn, inputs, device, case.min_reps, case.budget_s)
            row = {"bench": bench, "case": case.name, "impl": impl, "device": device, **timing}
            if case.memory:
                row["peak_mb"] = (peak_mb_cuda(fn, inputs) if device == "cuda"
                                  else peak_mb_fresh_process(bench, case.name, impl, device, quick))
            else:
                row["peak_mb"] = None
            if case.tokens:
                row["tokens_per_s"] = case.tokens / (timing["median_ms"] / 1e3)
            if case.bytes_moved:
                row["bytes_moved"] = case.bytes_moved
            if case.flops:
                row["flops"] = case.flops
            rows.append(row)
            peak = "-" if row["peak_mb"] is None else f"{row['peak_mb']:.1f}"
            print(f"{bench:>16} {case.name:>22} {impl:>24}  {timing['median_ms']:10.3f} ms  "
                  f"[{timing['p20_ms']:.3f}, {timing['p80_ms']:.3f}]  peak {peak} MB", flush=True)
        del inputs
        gc.collect()
    return rows
