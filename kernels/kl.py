"""KL estimators and reward shaping (Triton); the math is in ``rlhf_fast.ops.kl``.

kl_forward / kl_backward: one elementwise pass over the flattened tensors, the estimator a constexpr.
shape_rewards: a program per ``ROWS`` rows; a first sweep over the (1-byte) mask finds each row's last
valid token, a second reads the log-probs once and writes rewards and kl once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlhf_fast.kernels.configs import ELEMENTWISE_BLOCK, ELEMENTWISE_WARPS, ROW_WARPS, row_tiling


@triton.jit
def _expm1(x):
    """exp(x) - 1 without the cancellation near 0: Taylor to x^8 / 8! for |x| < 1/2, exp(x) - 1 elsewhere
    (the same split as csrc/loss_common.h expm1_full; triton 3.6 and 3.9 share no portable expm1)."""
    p = x * (1.0 / 40320.0) + (1.0 / 5040.0)
    p = p * x + (1.0 / 720.0)
    p = p * x + (1.0 / 120.0)
    p = p * x + (1.0 / 24.0)
    p = p * x + (1.0 / 6.0)
    p = p * x + 0.5
    p = (p * x) * x + x
    return tl.where(tl.abs(x) < 0.5, p, tl.exp(x) - 1.0)


@triton.jit
def _kl_value(x, EST: tl.constexpr):
    if EST == 0:
        v = x
    elif EST == 1:
        v = 0.5 * x * x
    elif EST == 2:
        v = _expm1(-x) + x
    else:
        v = tl.abs(x)
    return v


@triton.jit
def _kl_grad(x, EST: tl.constexpr):
    if EST == 0:
        g = tl.full(x.shape, 1.0, tl.float32)
    elif EST == 1:
        g = x
    elif EST == 2:
        g = -_expm1(-x)
    else:
        g = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
    return g


@triton.jit
def _clamp(v, c, CLAMP: tl.constexpr):
    if CLAMP:
        v = tl.where(v < -c, -c, tl.where(v > c, c, v))   # keeps NaN, as torch.clamp
    return v


@triton.jit
def _kl_fwd_kernel(a_ptr, b_ptr, out_ptr, N, c, EST: tl.constexpr, CLAMP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    x = tl.load(a_ptr + offs, mask=ok, other=0.0).to(tl.float32) - tl.load(b_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, _clamp(_kl_value(x, EST), c, CLAMP), mask=ok)


@triton.jit
def _kl_bwd_kernel(g_ptr, a_ptr, b_ptr, ga_ptr, gb_ptr, N, c, EST: tl.constexpr, STRAIGHT: tl.constexpr,
                   CLAMP: tl.constexpr, NEED_REF: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    x = tl.load(a_ptr + offs, mask=ok, other=0.0).to(tl.float32) - tl.load(b_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if STRAIGHT:
        d = g * x                                   # gradient of k2, whatever the value's estimator
    else:
        d = g * _kl_grad(x, EST)
        if CLAMP:
            v = _kl_value(x, EST)
            d = tl.where((v >= -c) & (v <= c), d, 0.0)
    tl.store(ga_ptr + offs, d.to(ga_ptr.dtype.element_ty), mask=ok)
    if NEED_REF:
        tl.store(gb_ptr + offs, (-d).to(gb_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _shape_rewards_kernel(s_ptr, a_ptr, b_ptr, m_ptr, rw_ptr, kl_ptr, B, T,
                          s_ab, s_at, s_bb, s_bt, s_mb, s_mt, coef, c, rc,
                          EST: tl.constexpr, CLAMP: tl.constexpr, CLIP: tl.constexpr,
                          ROWS: tl.constexpr, BLOCK_T: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    cols = tl.arange(0, BLOCK_T)
    last = tl.full([ROWS], -1, tl.int32)
    for start in range(0, T, BLOCK_T):
        t = start + cols
        ok = row_ok[:, None] & (t < T)[None, :]
        m = tl.load(m_ptr + rows[:, None] * s_mb + t[None, :] * s_mt, mask=ok, other=0) != 0
        last = tl.maximum(last, tl.max(tl.where(m, t[None, :], -1), axis=1))
    score = _clamp(tl.load(s_ptr + rows, mask=row_ok, other=0.0).to(tl.float32), rc, CLIP)
    for start in range(0, T, BLOCK_T):
        t = start + cols
        ok = row_ok[:, None] & (t < T)[None, :]
        rb, tt = rows[:, None], t[None, :]
        m = tl.load(m_ptr + rb * s_mb + tt * s_mt, mask=ok, other=0) != 0
        x = tl.load(a_ptr + rb * s_ab + tt * s_at, mask=ok, other=0.0).to(tl.float32) - \
            tl.load(b_ptr + rb * s_bb + tt * s_bt, mask=ok, other=0.0).to(tl.float32)
        k = tl.where(m, _clamp(_kl_value(x, EST), c, CLAMP), 0.0)
        r = -coef * k + tl.where(tt == last[:, None], score[:, None], 0.0)
        tl.store(kl_ptr + rb * T + tt, k, mask=ok)
        tl.store(rw_ptr + rb * T + tt, r, mask=ok)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1)


def kl_forward_triton(logp, ref_logp, est: int, clamp: float | None) -> torch.Tensor:
    out = torch.empty(logp.shape, dtype=torch.float32, device=logp.device)
    n = out.numel()
    if n:
        _kl_fwd_kernel[(triton.cdiv(n, ELEMENTWISE_BLOCK),)](_flat(logp), _flat(ref_logp), out, n, clamp or 0.0,
                                                  EST=est, CLAMP=clamp is not None, BLOCK=ELEMENTWISE_BLOCK,
                                                  num_warps=ELEMENTWISE_WARPS)
    return out


def kl_backward_triton(grad, logp, ref_logp, est: int, straight: bool, clamp: float | None, need_ref: bool):
    g_logp = torch.empty(logp.shape, dtype=logp.dtype, device=logp.device)
    g_ref = torch.empty(ref_logp.shape, dtype=ref_logp.dtype, device=ref_logp.device) if need_ref else None
    n = g_logp.numel()
    if n:
        _kl_bwd_kernel[(triton.cdiv(n, ELEMENTWISE_BLOCK),)](_flat(grad), _flat(logp), _flat(ref_logp), g_logp,
                                                  g_ref if need_ref else g_logp, n, clamp or 0.0, EST=est,
                                                  STRAIGHT=straight, CLAMP=clamp is not None,
                                                  NEED_REF=need_ref, BLOCK=ELEMENTWISE_BLOCK,
                                                  num_warps=ELEMENTWISE_WARPS)
    return g_logp, g_ref


def shape_rewards_triton(scores, logp, ref_logp, mask, kl_coef: float, est: int, reward_clip: float | None,
                         clamp: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    B, T = logp.shape
    rewards = torch.empty(B, T, dtype=torch.float32, device=logp.device)
    kl = torch.empty_like(rewards)
    if B == 0 or T == 0:
        return rewards, kl
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    rows, block_t, grid = row_tiling(B, T)
    _shape_rewards_kernel[grid](
        scores.contiguous(), logp, ref_logp, m, rewards, kl, B, T,
        logp.stride(0), logp.stride(1), ref_logp.stride(0), ref_logp.stride(1), m.stride(0), m.stride(1),
        float(kl_coef), clamp or 0.0, reward_clip or 0.0, EST=est, CLAMP=clamp is not None,
        CLIP=reward_clip is not None, ROWS=rows, BLOCK_T=block_t, num_warps=ROW_WARPS)
    return rewards, kl
