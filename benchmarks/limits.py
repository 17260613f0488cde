"""Physical limits of the machine, measured in the same run as the benchmarks.

    copy bandwidth  = 2 * nbytes(src) / t(dst.copy_(src))        bytes read + written per second
    matmul rate     = 2 * n**3 / t(a @ b)                          FLOP/s, fp32 on CPU, bf16 on CUDA

each from the 20th-percentile time over repetitions on tensors far larger than the caches (a peak rate: the
faster repetitions, which a transient load elsewhere on the machine cannot slow; 2026-12-04 a median over
1 s read half the matmul rate while another process started). A row with ``bytes_moved``
and/or ``flops`` gets the roofline time of the op::

    limit_ms     = max(bytes_moved / bandwidth, flops / matmul rate) * 1e3
    roofline_pct = 100 * limit_ms / median_ms                       (100% = at the physical limit)
"""
from __future__ import annotations

import torch

from benchmarks.harness import time_impl


def measure(device: str, quick: bool) -> dict:
    """``{"copy_GBps", "copy_MiB", "matmul_GFLOPs", "matmul_n", "matmul_dtype"}`` of ``device``."""
    copy_mib = 1024 if device == "cuda" else 256
    src = torch.ones(copy_mib * 2**18, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t_copy = time_impl(lambda _: dst.copy_(src), {}, device, min_reps=10, budget_s=1.0)["p20_ms"]
    del src, dst
    n = 8192 if device == "cuda" else (1536 if quick else 2048)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    t_mm = time_impl(lambda _: a @ b, {}, device, min_reps=5, budget_s=1.0 if quick else 3.0)["p20_ms"]
    del a, b
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"copy_GBps": 2 * copy_mib * 2**20 / (t_copy * 1e-3) / 1e9, "copy_MiB": copy_mib,
            "matmul_GFLOPs": 2 * n**3 / (t_mm * 1e-3) / 1e9, "matmul_n": n, "matmul_dtype": str(dtype)[6:]}


def annotate(rows: list[dict], limits: dict) -> None:
    """Add ``limit_ms``, ``limit_kind`` ("memory" | "compute") and ``roofline_pct`` to rows that allow it."""
    for row in rows:
        bounds = {}
        if row.get("bytes_moved"):
            bounds["memory"] = row["bytes_moved"] / (limits["copy_GBps"] * 1e9) * 1e3
        if row.get("flops"):
            bounds["compute"] = row["flops"] / (limits["matmul_GFLOPs"] * 1e9) * 1e3
        if not bounds:
            continue
        kind = max(bounds, key=bounds.get)
        row["limit_ms"], row["limit_kind"] = bounds[kind], kind
        if row.get("median_ms"):
            row["roofline_pct"] = 100 * row["limit_ms"] / row["median_ms"]
