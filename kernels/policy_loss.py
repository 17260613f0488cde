"""Clipped PPO policy loss (Triton): one fused forward and one fused backward kernel.

A program owns ``ROWS`` rows and sweeps them in ``BLOCK_T`` chunks (``rlhf_fast.kernels.configs``).
Forward: per-row partials ``[B, 10]`` fp32 in the column order of ``rlhf_fast.ops.policy_loss.POLICY_PARTS``
(and, with TOKEN_OUT, the masked per-token loss); backward: ``dlogp = coef * m * dpg/dlogp`` with ``coef``
the per-row ``g * s_b`` or the per-token upstream gradient. Per-token math as in the op's docstring.
Inputs must be contiguous ``[B, T]`` (the op makes them so).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlhf_fast.kernels.configs import ROW_WARPS, row_tiling

@triton.jit
def _policy_token(lp, olp, a, rlp, lo, hi, dual, cap, HAS_TIS: tl.constexpr):
    """(w*pg, d(w*pg)/dlogp, ratio, clamped log-ratio, w, clip?, dual clip?, w capped?); 20 = the log-ratio bound."""
    raw = lp - olp
    lr = tl.minimum(tl.maximum(raw, -20.0), 20.0)
    r = tl.exp(lr)
    pg1 = -a * r
    pg2 = -a * tl.minimum(tl.maximum(r, lo), hi)
    clip = pg2 > pg1
    pg = tl.where(clip, pg2, pg1)
    pg3 = -a * dual
    dual_on = (a < 0) & (pg > pg3)
    pg = tl.where(dual_on, pg3, pg)
    if HAS_TIS:
        w_raw = tl.exp(tl.minimum(tl.maximum(olp - rlp, -20.0), 20.0))
        w_clip = w_raw > cap
        w = tl.where(w_clip, cap, w_raw)
    else:
        w_clip = r < 0.0
        w = r * 0.0 + 1.0
    blocked = clip | dual_on | (raw < -20.0) | (raw > 20.0)  # no gradient: a clip or the log-ratio clamp is active
    return w * pg, tl.where(blocked, 0.0, w * pg1), r, lr, w, clip, dual_on, w_clip


@triton.jit
def _load_token(lp_ptr, olp_ptr, a_ptr, rlp_ptr, m_ptr, offs, ok, HAS_TIS: tl.constexpr):
    m = tl.load(m_ptr + offs, mask=ok, other=0) != 0
    lp = tl.load(lp_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    olp = tl.load(olp_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_TIS:
        rlp = tl.load(rlp_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    else:
        rlp = olp
    return m, lp, olp, a, rlp


@triton.jit
def _policy_fwd_kernel(lp_ptr, olp_ptr, a_ptr, rlp_ptr, w_ptr, m_ptr, parts_ptr, tok_ptr, R, T, lo, hi, dual, cap,
                       HAS_TIS: tl.constexpr, HAS_W: tl.constexpr, TOKEN_OUT: tl.constexpr, ROWS: tl.constexpr,
                       BLOCK_T: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < R
    cols = tl.arange(0, BLOCK_T)
    loss = tl.zeros([ROWS], tl.float32)
    n = tl.zeros([ROWS], tl.float32)
    n_clip = tl.zeros([ROWS], tl.float32)
    n_dual = tl.zeros([ROWS], tl.float32)
    nkl = tl.zeros([ROWS], tl.float32)
    rsum = tl.zeros([ROWS], tl.float32)
    rmax = tl.full([ROWS], float("-inf"), tl.float32)
    rmin = tl.full([ROWS], float("inf"), tl.float32)
    wsum = tl.zeros([ROWS], tl.float32)
    n_wclip = tl.zeros([ROWS], tl.float32)
    for start in range(0, T, BLOCK_T):
        t = start + cols
        ok = row_ok[:, None] & (t < T)[None, :]
        offs = rows[:, None] * T + t[None, :]
        m, lp, olp, a, rlp = _load_token(lp_ptr, olp_ptr, a_ptr, rlp_ptr, m_ptr, offs, ok, HAS_TIS)
        pg, _dpg, r, lr, w, clip, dual_on, w_clip = _policy_token(lp, olp, a, rlp, lo, hi, dual, cap, HAS_TIS)
        if HAS_W:
            pg = pg * tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        pg = tl.where(m, pg, 0.0)
        if TOKEN_OUT:
            tl.store(tok_ptr + offs, pg, mask=ok)
        loss += tl.sum(pg, axis=1)
        n += tl.sum(m.to(tl.float32), axis=1)
        n_clip += tl.sum((m & clip).to(tl.float32), axis=1)
        n_dual += tl.sum((m & dual_on).to(tl.float32), axis=1)
        nkl -= tl.sum(tl.where(m, lr, 0.0), axis=1)
        rsum += tl.sum(tl.where(m, r, 0.0), axis=1)
        rmax = tl.maximum(rmax, tl.max(tl.where(m, r, float("-inf")), axis=1))
        rmin = tl.minimum(rmin, tl.min(tl.where(m, r, float("inf")), axis=1))
        wsum += tl.sum(tl.where(m, w, 0.0), axis=1)
        n_wclip += tl.sum((m & w_clip).to(tl.float32), axis=1)
    out = parts_ptr + rows * 10
    tl.store(out, loss, mask=row_ok)
    tl.store(out + 1, n, mask=row_ok)
    tl.store(out + 2, n_clip, mask=row_ok)
    tl.store(out + 3, n_dual, mask=row_ok)
    tl.store(out + 4, nkl, mask=row_ok)
    tl.store(out + 5, rsum, mask=row_ok)
    tl.store(out + 6, rmax, mask=row_ok)
    tl.store(out + 7, rmin, mask=row_ok)
    tl.store(out + 8, wsum, mask=row_ok)
    tl.store(out + 9, n_wclip, mask=row_ok)


@triton.jit
def _policy_bwd_kernel(lp_ptr, olp_ptr, a_ptr, rlp_ptr, w_ptr, m_ptr, coef_ptr, grad_ptr, R, T, lo, hi, dual,
                       cap, HAS_TIS: tl.constexpr, HAS_W: tl.constexpr, COEF_PER_TOKEN: tl.constexpr,
                       ROWS: tl.constexpr, BLOCK_T: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < R
    cols = tl.arange(0, BLOCK_T)
    if not COEF_PER_TOKEN:
        row_c = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    for start in range(0, T, BLOCK_T):
        t = start + cols
        ok = row_ok[:, None] & (t < T)[None, :]
        offs = rows[:, None] * T + t[None, :]
        m, lp, olp, a, rlp = _load_token(lp_ptr, olp_ptr, a_ptr, rlp_ptr, m_ptr, offs, ok, HAS_TIS)
        _pg, dpg, _r, _lr, _w, _clip, _dual_on, _w_clip = _policy_token(lp, olp, a, rlp, lo, hi, dual, cap, HAS_TIS)
        if COEF_PER_TOKEN:
            g = tl.load(coef_ptr + offs, mask=ok, other=0.0)
        else:
            g = row_c[:, None]
        if HAS_W:
            dpg = dpg * tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(grad_ptr + offs, tl.where(m, g * dpg, 0.0).to(grad_ptr.dtype.element_ty), mask=ok)


def _args(logp, old_logp, advantages, mask, rollout_logp, weight):
    """Kernel pointers (absent optional inputs point at ``logp``, never read) and their HAS_TIS / HAS_W flags."""
    m = mask.view(torch.uint8)
    flags = dict(HAS_TIS=rollout_logp is not None, HAS_W=weight is not None)
    return (logp, old_logp, advantages, logp if rollout_logp is None else rollout_logp,
            logp if weight is None else weight, m), flags


def policy_loss_forward_triton(logp, old_logp, advantages, mask, rollout_logp, weight, clip_low, clip_high,
                               dual_clip, tis_cap, token_out: bool):
    """``(parts [B, 10] fp32, token_loss [B, T] fp32 or None)``; contiguous inputs, bool mask."""
    B, T = logp.shape
    parts = torch.zeros(B, 10, dtype=torch.float32, device=logp.device)
    tok = torch.empty(B, T, dtype=torch.float32, device=logp.device) if token_out else None
    if B == 0 or T == 0:
        return parts, tok
    ptrs, flags = _args(logp, old_logp, advantages, mask, rollout_logp, weight)
    rows, block_t, grid = row_tiling(B, T)
    _policy_fwd_kernel[grid](*ptrs, parts, tok if token_out else parts, B, T, 1.0 - clip_low, 1.0 + clip_high,
                             dual_clip, tis_cap, **flags, TOKEN_OUT=token_out, ROWS=rows, BLOCK_T=block_t,
                             num_warps=ROW_WARPS)
    return parts, tok


def policy_loss_backward_triton(logp, old_logp, advantages, mask, rollout_logp, weight, coef, clip_low, clip_high,
                                dual_clip, tis_cap):
    """``dloss/dlogp`` ``[B, T]`` in the dtype of ``logp``; ``coef`` ``[B]`` (per row) or ``[B, T]``, contiguous."""
    B, T = logp.shape
    grad = torch.empty_like(logp)
    if B == 0 or T == 0:
        return grad
    ptrs, flags = _args(logp, old_logp, advantages, mask, rollout_logp, weight)
    rows, block_t, grid = row_tiling(B, T)
    _policy_bwd_kernel[grid](*ptrs, coef, grad, B, T, 1.0 - clip_low, 1.0 + clip_high, dual_clip, tis_cap,
                             **flags, COEF_PER_TOKEN=coef.dim() == 2, ROWS=rows, BLOCK_T=block_t,
                             num_warps=ROW_WARPS)
    return grad
