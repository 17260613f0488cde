"""GAE as two parallel scans (Triton).

The mask-aware recursion of ``rlhf_fast.ops.gae`` is, walking each row backwards, the affine map
``A_t = d_t + c_t * A_{t+1}`` with ``c_t = gamma*lam, d_t = delta_t`` at valid positions and ``c_t = 1,
d_t = 0`` at masked ones (they carry the state through). ``delta_t`` needs ``V_next(t)``, the value at the
next valid position after t: an inclusive "last valid" scan over the mask and values shifted by one.

A program owns ``ROWS`` rows and walks them from the end in tiles of ``BLOCK_T`` positions, loading
each tile in reversed order (j = 0 is the latest position) so both recursions become forward
``tl.associative_scan``s along axis 1; the state at the tile's last column carries to the next tile.
Every input is read once (plus a one-element-shifted reread that hits cache), every output written
once. Small-T batches pack many rows per program, so the grid stays small even for >65,536 rows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlhf_fast.kernels.configs import GAE_MAX_ELEMS, ROW_WARPS, row_tiling


@triton.jit
def _affine_combine(c1, d1, c2, d2):
    # apply (c1, d1) first, then (c2, d2):  x -> d2 + c2 * (d1 + c1 * x)
    return c1 * c2, d2 + c2 * d1


@triton.jit
def _last_valid_combine(f1, v1, f2, v2):
    return f1 | f2, tl.where(f2 != 0, v2, v1)


@triton.jit
def _gae_kernel(r_ptr, v_ptr, m_ptr, adv_ptr, ret_ptr, B, T,
                s_rb, s_rt, s_vb, s_vt, s_mb, s_mt,
                gamma, gamma_lam,
                ROWS: tl.constexpr, BLOCK_T: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    cols = tl.arange(0, BLOCK_T)
    carry_a = tl.zeros([ROWS], dtype=tl.float32)       # advantage at the next valid position
    carry_v = tl.zeros([ROWS], dtype=tl.float32)       # value at the next valid position
    for start in range(0, T, BLOCK_T):
        t = T - 1 - start - cols                        # reversed: column j is time T-1-start-j
        ok = row_ok[:, None] & (t >= 0)[None, :]
        rb, tt = rows[:, None], t[None, :]
        m = tl.load(m_ptr + rb * s_mb + tt * s_mt, mask=ok, other=0) != 0
        r = tl.load(r_ptr + rb * s_rb + tt * s_rt, mask=ok, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + rb * s_vb + tt * s_vt, mask=ok, other=0.0).to(tl.float32)
        # V_next(t): last valid value among positions t+1, t+2, ... (shifted inputs, then the carry)
        ok1 = row_ok[:, None] & (t + 1 < T)[None, :] & (t + 1 >= 0)[None, :]
        m1 = tl.load(m_ptr + rb * s_mb + (tt + 1) * s_mt, mask=ok1, other=0) != 0
        v1 = tl.load(v_ptr + rb * s_vb + (tt + 1) * s_vt, mask=ok1, other=0.0).to(tl.float32)
        f_scan, v_scan = tl.associative_scan((m1.to(tl.int32), v1), 1, _last_valid_combine)
        v_next = tl.where(f_scan != 0, v_scan, carry_v[:, None])
        delta = r + gamma * v_next - v
        c = tl.where(m, gamma_lam, 1.0)
        d = tl.where(m, delta, 0.0)
        c_scan, d_scan = tl.associative_scan((c, d), 1, _affine_combine)
        a = d_scan + c_scan * carry_a[:, None]
        tl.store(adv_ptr + rb * T + tt, tl.where(m, a, 0.0), mask=ok)
        tl.store(ret_ptr + rb * T + tt, tl.where(m, a + v, 0.0), mask=ok)
        last = cols[None, :] == BLOCK_T - 1
        carry_a = tl.sum(tl.where(last, a, 0.0), axis=1)
        # the next tile's shifted loads restart at this tile's last position, so carry V_next from there
        carry_v = tl.sum(tl.where(last, v_next, 0.0), axis=1)


def gae_triton(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float,
               max_block_t: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(advantages, returns)`` ``[B, T]``; inputs any float dtype and strides, mask bool.
    ``max_block_t`` (a power of two) caps the tile length; tests lower it to cover multi-tile rows cheaply."""
    B, T = rewards.shape
    adv = torch.empty(B, T, dtype=torch.float32, device=rewards.device)
    ret = torch.empty_like(adv)
    if B == 0 or T == 0:
        return adv, ret
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    rows, block_t, grid = row_tiling(B, T, max_block_t, GAE_MAX_ELEMS)
    _gae_kernel[grid](rewards, values, m, adv, ret, B, T,
                      rewards.stride(0), rewards.stride(1), values.stride(0), values.stride(1),
                      m.stride(0), m.stride(1), float(gamma), float(gamma * lam),
                      ROWS=rows, BLOCK_T=block_t, num_warps=ROW_WARPS)
    return adv, ret
