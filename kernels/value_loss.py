"""Clipped PPO value loss (Triton): one fused forward and one fused backward kernel.

A program owns ``ROWS`` rows and sweeps them in ``BLOCK_T`` chunks (``rlhf_fast.kernels.configs``).
Forward: per-row partials ``[B, 8]`` fp32 in the column order of ``rlhf_fast.ops.value_loss.VALUE_PARTS``
(and, with TOKEN_OUT, the masked per-token loss); backward: ``dv = coef * m * dl/dv`` with ``coef`` the per-row
``g * s_b`` or the per-token upstream gradient. Per-token math as in the op's docstring.
Inputs must be contiguous ``[B, T]`` (the op makes them so).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlhf_fast.kernels.configs import ROW_WARPS, row_tiling


@triton.jit
def _load_value(v_ptr, old_ptr, ret_ptr, m_ptr, offs, ok, clip):
    """(mask, v, R, 0.5 * max((v - R)^2, (v_clip - R)^2), dl/dv, clipped?) of one tile."""
    m = tl.load(m_ptr + offs, mask=ok, other=0) != 0
    v = tl.load(v_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    ret = tl.load(ret_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    vc = tl.minimum(tl.maximum(v, old - clip), old + clip)
    d1 = v - ret
    d2 = vc - ret
    clipped = d2 * d2 > d1 * d1
    loss = 0.5 * tl.where(clipped, d2 * d2, d1 * d1)
    return m, v, ret, loss, tl.where(clipped, 0.0, d1), clipped


@triton.jit
def _value_fwd_kernel(v_ptr, old_ptr, ret_ptr, m_ptr, parts_ptr, tok_ptr, R, T, clip,
                      TOKEN_OUT: tl.constexpr, ROWS: tl.constexpr, BLOCK_T: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < R
    cols = tl.arange(0, BLOCK_T)
    loss = tl.zeros([ROWS], tl.float32)
    n = tl.zeros([ROWS], tl.float32)
    n_clip = tl.zeros([ROWS], tl.float32)
    sv = tl.zeros([ROWS], tl.float32)
    sr = tl.zeros([ROWS], tl.float32)
    sr2 = tl.zeros([ROWS], tl.float32)
    se = tl.zeros([ROWS], tl.float32)
    se2 = tl.zeros([ROWS], tl.float32)
    for start in range(0, T, BLOCK_T):
        t = start + cols
        ok = row_ok[:, None] & (t < T)[None, :]
        offs = rows[:, None] * T + t[None, :]
        m, v, ret, l, _dl, clipped = _load_value(v_ptr, old_ptr, ret_ptr, m_ptr, offs, ok, clip)
        l = tl.where(m, l, 0.0)
        if TOKEN_OUT:
            tl.store(tok_ptr + offs, l, mask=ok)
        v = tl.where(m, v, 0.0)
        ret = tl.where(m, ret, 0.0)
        e = ret - v
        loss += tl.sum(l, axis=1)
        n += tl.sum(m.to(tl.float32), axis=1)
        n_clip += tl.sum((m & clipped).to(tl.float32), axis=1)
        sv += tl.sum(v, axis=1)
        sr += tl.sum(ret, axis=1)
        sr2 += tl.sum(ret * ret, axis=1)
        se += tl.sum(e, axis=1)
        se2 += tl.sum(e * e, axis=1)
    out = parts_ptr + rows * 8
    tl.store(out, loss, mask=row_ok)
    tl.store(out + 1, n, mask=row_ok)
    tl.store(out + 2, n_clip, mask=row_ok)
    tl.store(out + 3, sv, mask=row_ok)
    tl.store(out + 4, sr, mask=row_ok)
    tl.store(out + 5, sr2, mask=row_ok)
    tl.store(out + 6, se, mask=row_ok)
    tl.store(out + 7, se2, mask=row_ok)


@triton.jit
def _value_bwd_kernel(v_ptr, old_ptr, ret_ptr, m_ptr, coef_ptr, grad_ptr, R, T, clip,
                      COEF_PER_TOKEN: tl.constexpr, ROWS: tl.constexpr, BLOCK_T: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < R
    cols = tl.arange(0, BLOCK_T)
    if not COEF_PER_TOKEN:
        row_c = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    for start in range(0, T, BLOCK_T):
        t = start + cols
        ok = row_ok[:, None] & (t < T)[None, :]
        offs = rows[:, None] * T + t[None, :]
        m, _v, _ret, _l, dl, _clipped = _load_value(v_ptr, old_ptr, ret_ptr, m_ptr, offs, ok, clip)
        if COEF_PER_TOKEN:
            g = tl.load(coef_ptr + offs, mask=ok, other=0.0)
        else:
            g = row_c[:, None]
        tl.store(grad_ptr + offs, tl.where(m, g * dl, 0.0).to(grad_ptr.dtype.element_ty), mask=ok)


def value_loss_forward_triton(values, old_values, returns, mask, clip, token_out: bool):
    """``(parts [B, 8] fp32, token_loss [B, T] fp32 or None)``; contiguous inputs, bool mask."""
    B, T = values.shape
    parts = torch.zeros(B, 8, dtype=torch.float32, device=values.device)
    tok = torch.empty(B, T, dtype=torch.float32, device=values.device) if token_out else None
    if B == 0 or T == 0:
        return parts, tok
    rows, block_t, grid = row_tiling(B, T)
    _value_fwd_kernel[grid](values, old_values, returns, mask.view(torch.uint8), parts,
                            tok if token_out else parts, B, T, clip, TOKEN_OUT=token_out, ROWS=rows,
                            BLOCK_T=block_t, num_warps=ROW_WARPS)
    return parts, tok


def value_loss_backward_triton(values, old_values, returns, mask, coef, clip):
    """``dloss/dvalues`` ``[B, T]`` in the dtype of ``values``; ``coef`` ``[B]`` (per row) or ``[B, T]``."""
    B, T = values.shape
    grad = torch.empty_like(values)
    if B == 0 or T == 0:
        return grad
    rows, block_t, grid = row_tiling(B, T)
    _value_bwd_kernel[grid](values, old_values, returns, mask.view(torch.uint8), coef, grad, B, T, clip,
                            COEF_PER_TOKEN=coef.dim() == 2, ROWS=rows, BLOCK_T=block_t, num_warps=ROW_WARPS)
    return grad
