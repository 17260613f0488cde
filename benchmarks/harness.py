"""Timing and memory measurement shared by every benchmark.

A benchmark module ``benchmarks/<name>.py`` defines ``cases(quick: bool, device: str) -> list[Case]``.
Each :class:`Case` builds its inputs once and names the implementations to compare
(``rlhf_fast`` for ours, the peer's name otherwise: ``trl``, ``verl-loop``, ``openrlhf-eager``, ...;
every impl whose name starts with ``rlhf_fast`` counts as ours in the report).
Rows are ``{"bench", "case", "impl", "device", "median_ms", "p20_ms", "p80_ms", "reps", "peak_mb",
"size", "size_label", "family", ...}``; an impl that raised has ``median_ms = None`` and ``error``.

Timing: one warm-up call, then at least ``min_reps`` calls and up to ``budget_s`` seconds;
on CUDA each call is timed with CUDA events after flushing the L2 cache (as triton's do_bench does).

peak_mb is what an implementation allocates beyond its inputs and the outputs it returns:
on CPU, in a fresh process (``python -m benchmarks.memprobe``), the peak RSS of one call after a
warm-up call, over the RSS just before it, minus the returned tensors; on CUDA, the allocator's peak
over the same baseline. Cases with ``memory_scope="process"`` (end-to-end iterations) report instead the
fresh process's whole peak RSS during one call after a warm-up (rows get ``peak_scope: "process"``).

Problem size (x axis of the report's charts): ``Case.size`` / ``Case.size_label`` when given,
else parsed from the case name by :func:`parse_size`.
"""
from __future__ import annotations

import dataclasses
import gc
import importlib
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any, Callable

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


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
    memory_scope: str = "extra"         # "extra": beyond inputs and outputs; "process": the whole process's peak
                                        # resident memory during a call (end-to-end benches: models, engines and
                                        # optimizer state are the memory), CPU only
    size: float | None = None           # problem size for the charts; None: parsed from the name
    size_label: str = ""                # what size counts, e.g. "tokens", "N·V"
    row_extra: Callable[[str, dict], dict] | None = None  # (impl, inputs) -> extra row fields, after timing


def is_ours(impl: str) -> bool:
    return impl.startswith("rlhf_fast")


def lazy_impl(impl: str, build: Callable[[], Any], step: Callable[[Any], None]) -> Callable[[dict], None]:
    """An end-to-end impl that builds its own state (a trainer) on its first (warm-up) call, into
    ``inputs[impl]``: a memory-probe process then holds only that impl's state."""
    def run(inputs: dict) -> None:
        if impl not in inputs:
            inputs[impl] = build()
        step(inputs[impl])
    return run


def bench_module(name: str):
    """``gae`` -> ``benchmarks.gae``; a dotted name (e.g. a test's own bench) is imported as given."""
    return importlib.import_module(name if "." in name else f"benchmarks.{name}")


# A dimension is an upper-case letter (optionally followed by lower-case ones) and a number with an
# optional k/M/G multiplier: B64, T1024, V32k, Hd128. Dimensions joined by "x" form the size group.
_DIM = r"[A-Z][a-z]*\d+(?:\.\d+)?[kMG]?"
_GROUP = re.compile(rf"(?<![A-Za-z0-9])({_DIM}(?:x{_DIM})*)(?![A-Za-z0-9])")
_DIM_PARTS = re.compile(r"([A-Z][a-z]*)(\d+(?:\.\d+)?)([kMG]?)")
_MULT = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9}


def parse_size(case_name: str) -> tuple[float | None, str, str]:
    """``(size, label, family)`` from a case name, by the naming convention of the bench modules.

    The first group of dimensions joined by ``x`` is the problem size, its product the size:
    ``B64xT1024`` -> ``(65536, "B·T", ...)``, ``N8192xV32000-bf16`` -> ``(N*V, "N·V", "*-bf16")``,
    ``V32k`` -> ``(32000, "V", "*")``. ``family`` is the name with that group replaced by ``*``:
    cases of one family differ only in size and form one line on a chart. No group: ``(None, "", name)``.
    """
    m = _GROUP.search(case_name)
    if not m:
        return None, "", case_name
    size, letters = 1.0, []
    for letter, num, mult in _DIM_PARTS.findall(m.group(1)):
        size *= float(num) * _MULT[mult]
        letters.append(letter)
    family = case_name[:m.start()] + "*" + case_name[m.end():]
    return size, "·".join(letters), family


def case_size(case: Case) -> tuple[float | None, str, str]:
    size, label, family = parse_size(case.name)
    if case.size is not None:
        return float(case.size), case.size_label or label, family
    return size, label, family


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


def _quantiles(times: list[float]) -> dict:
    qs = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    return {"median_ms": statistics.median(times), "p20_ms": qs[1], "p80_ms": qs[7], "reps": len(times)}


def time_impl(fn: Callable[[dict], Any], inputs: dict, device: str, min_reps: int, budget_s: float) -> dict:
    """Median and 20th/80th percentile wall time of ``fn(inputs)`` after one warm-up call."""
    fn(inputs)
    _sync(device)
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda") if device == "cuda" else None
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < 200):
        if flush is not None:
            flush.zero_()
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            fn(inputs)
            t1.record()
            t1.synchronize()
            times.append(t0.elapsed_time(t1))
        else:
            t0 = time.perf_counter()
            fn(inputs)
            times.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(times)


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
    # A fixed mmap threshold stops glibc from keeping freed large blocks in the heap (its default
    # threshold grows with every freed block), so RSS follows what is live and peaks are comparable.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    if res.returncode != 0:
        print(f"  memprobe failed for {bench}/{case}/{impl}: {res.stderr.strip()[-500:]}", file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_mb"]


def _error(err: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(err), err)).strip()[-500:]


def run_cases(bench: str, cases: list[Case], device: str, quick: bool,
              progress: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Time (and memory-probe) every impl of every case; an impl that raises becomes an error row.

    ``progress(rows)`` is called after each case, so a caller can save partial results.
    """
    rows: list[dict] = []
    for case in cases:
        size, size_label, family = case_size(case)
        base = {"bench": bench, "case": case.name, "device": device,
                "size": size, "size_label": size_label, "family": family}
        if case.bytes_moved:
            base["bytes_moved"] = case.bytes_moved
        if case.flops:
            base["flops"] = case.flops
        try:
            inputs = case.make_inputs()
        except Exception as err:  # noqa: BLE001 - reported in the row, the suite goes on
            inputs, setup_error = None, _error(err)
        for impl, fn in case.impls.items():
            row = {**base, "impl": impl}
            try:
                if inputs is None:
                    raise RuntimeError(f"make_inputs failed: {setup_error}")
                timing = time_impl(fn, inputs, device, case.min_reps, case.budget_s)
            except Exception as err:  # noqa: BLE001
                row.update(median_ms=None, p20_ms=None, p80_ms=None, reps=0, peak_mb=None, error=_error(err))
                rows.append(row)
                print(f"{bench:>16} {case.name:>22} {impl:>24}  FAILED: {row['error']}", flush=True)
                continue
            row.update(timing)
            row["peak_mb"] = None
            if case.memory_scope != "extra":
                row["peak_scope"] = case.memory_scope
            if case.memory:
                row["peak_mb"] = (peak_mb_cuda(fn, inputs) if device == "cuda"
                                  else peak_mb_fresh_process(bench, case.name, impl, device, quick))
            if case.tokens:
                row["tokens_per_s"] = case.tokens / (timing["median_ms"] / 1e3)
            if case.row_extra is not None:
                row.update(case.row_extra(impl, inputs))
            rows.append(row)
            peak = "-" if row["peak_mb"] is None else f"{row['peak_mb']:.1f}"
            print(f"{bench:>16} {case.name:>22} {impl:>24}  {timing['median_ms']:10.3f} ms  "
                  f"[{timing['p20_ms']:.3f}, {timing['p80_ms']:.3f}]  peak {peak} MB", flush=True)
        del inputs
        gc.collect()
        if progress is not None:
            progress(rows)
    return rows
