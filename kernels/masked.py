"""Per-row masked statistics (Triton) for the global masked mean / var / whiten of ``rlhf_fast.ops.masked``.

A program owns ``ROWS`` rows: a first sweep accumulates count and sum, a second (re-reading the row,
from cache on a GPU) the centred sum of squares, so the result is as accurate as a two-pass variance.
Output ``[R, 3]`` fp32 = (count, mean, M2) per row; the op merges rows with Chan's formula.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlhf_fast.kernels.configs import ROW_WARPS, row_tiling


@triton.jit
def _row_stats_kernel(x_ptr, m_ptr, out_ptr, R, T, s_xr, s_xt, s_mr, s_mt,
                      ROWS: tl.constexpr, BLOCK_T: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < R
    cols = tl.arange(0, BLOCK_T)
    n = tl.zeros([ROWS], tl.float32)
    s = tl.zeros([ROWS], tl.float32)
    for start in range(0, T, BLOCK_T):
        t = start + cols
        ok = row_ok[:, None] & (t < T)[None, :]
        m = tl.load(m_ptr + rows[:, None] * s_mr + t[None, :] * s_mt, mask=ok, other=0) != 0
        x = tl.load(x_ptr + rows[:, None] * s_xr + t[None, :] * s_xt, mask=ok, other=0.0).to(tl.float32)
        n += tl.sum(m.to(tl.float32), axis=1)
        s += tl.sum(tl.where(m, x, 0.0), axis=1)
    mean = tl.where(n > 0, s / tl.maximum(n, 1.0), 0.0)
    m2 = tl.zeros([ROWS], tl.float32)
    for start in range(0, T, BLOCK_T):
        t = start + cols
        ok = row_ok[:, None] & (t < T)[None, :]
        m = tl.load(m_ptr + rows[:, None] * s_mr + t[None, :] * s_mt, mask=ok, other=0) != 0
        x = tl.load(x_ptr + rows[:, None] * s_xr + t[None, :] * s_xt, mask=ok, other=0.0).to(tl.float32)
        d = tl.where(m, x - mean[:, None], 0.0)
        m2 += tl.sum(d * d, axis=1)
    tl.store(out_ptr + rows * 3, n, mask=row_ok)
    tl.store(out_ptr + rows * 3 + 1, mean, mask=row_ok)
    tl.store(out_ptr + rows * 3 + 2, m2, mask=row_ok)


def masked_row_stats_triton(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[R, 3]`` fp32 (count, mean, M2) of the valid entries of each row of ``x`` ``[R, T]`` (any strides)."""
    R, T = x.shape
    out = torch.zeros(R, 3, dtype=torch.float32, device=x.device)
    if R == 0 or T == 0:
        return out
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    rows, block_t, grid = row_tiling(R, T)
    _row_stats_kernel[grid](x, m, out, R, T, x.stride(0), x.stride(1), m.stride(0), m.stride(1),
                                               ROWS=rows, BLOCK_T=block_t, num_warps=ROW_WARPS)
    return out
