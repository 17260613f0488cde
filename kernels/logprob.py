"""Triton kernels for per-token log-prob and entropy from logits (math: rlhf_fast/ops/logprob.py).

Each program owns R rows (R = 1 for large V) and sweeps V in blocks of BLOCK_V once, with an online
log-sum-exp per row: a running max ``m`` (initialised to -inf, never 0) and per-lane partial sums
rescaled by ``alpha = exp(m_old - m_new)`` when the max grows::

    Z_lane <- alpha * Z_lane + e_j                                   e_j = exp(s_j - m)
    D_lane <- alpha * (D_lane + Z_lane_old * (m_old - m_new)) + e_j * (s_j - m)     (entropy only)
    lse = m + log Z,   logp = s_y - lse,   H = log Z - D / Z

The backward recomputes ``p_j = exp(s_j - lse)`` from the saved lse and writes the gradient of the
log-prob and entropy together in one sweep (a second, read-only sweep recomputes H when it is not given).
The grid is 1-D over row groups (axis 0 allows 2^31 - 1 programs, so no 65,535 limit). Rows are addressed
as ``(n // T) * stride_b + (n % T) * stride_t``, so [B, T, V] views such as ``logits[:, :-1]`` need no copy.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlhf_fast._backend import triton_interpreting
from rlhf_fast.kernels.configs import logprob_tiling

_MIN_EXP_ARG = tl.constexpr(-87.0)  # exp(-87) > FLT_MIN; keeps p * log p finite for -inf logits (as the native backend)


@triton.jit
def _row_offsets(rows, T, stride_b, stride_t):
    return (rows // T) * stride_b + (rows % T) * stride_t


@triton.jit
def _logprob_fwd_kernel(logits_ptr, labels_ptr, logp_ptr, ent_ptr, lse_ptr, N, V, T, stride_b, stride_t,
                        inv_tau, ignore_index, NEED_ENTROPY: tl.constexpr, R: tl.constexpr,
                        BLOCK_V: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
    row_ok = rows < N
    rows_base = logits_ptr + _row_offsets(tl.minimum(rows, N - 1), T, stride_b, stride_t)  # tail: repeat row N-1
    base = rows_base[:, None]
    cols = tl.arange(0, BLOCK_V)[None, :]
    m = tl.full([R], float("-inf"), tl.float32)
    Z = tl.zeros([R, BLOCK_V], tl.float32)
    D = tl.zeros([R, BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        s = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32) * inv_tau
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # all -inf so far: keep sums at 0, no NaN
        alpha = tl.exp(m - m_safe)[:, None]                       # 0 on the first block (m = -inf)
        d = tl.maximum(s - m_safe[:, None], -3.0e38)  # -inf -> a finite d with e = 0, so e * d = 0
        e = tl.exp(d)
        if NEED_ENTROPY:
            shift = tl.where(m == float("-inf"), 0.0, m - m_safe)[:, None]
            D = alpha * (D + Z * shift) + e * d
        Z = alpha * Z + e
        m = m_new
    m = tl.where(m == float("-inf"), 0.0, m)
    z_sum = tl.sum(Z, axis=1)
    log_z = tl.log(z_sum)
    y = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
    valid = y != ignore_index
    hit = valid & (y >= 0) & (y < V)   # a label outside the row (another vocab slice): logp = 0, H as usual
    s_y = tl.load(rows_base + tl.where(hit, y, 0)).to(tl.float32) * inv_tau
    tl.store(lse_ptr + rows, m + log_z, mask=row_ok)
    tl.store(logp_ptr + rows, tl.where(hit, tl.minimum(s_y - m - log_z, 0.0), 0.0), mask=row_ok)
    if NEED_ENTROPY:
        h = tl.maximum(log_z - tl.sum(D, axis=1) / z_sum, 0.0)
        tl.store(ent_ptr + rows, tl.where(valid, h, 0.0), mask=row_ok)


@triton.jit
def _logprob_bwd_kernel(logits_ptr, labels_ptr, lse_ptr, glogp_ptr, gent_ptr, ent_ptr, out_ptr, N, V, T,
                        stride_b, stride_t, out_stride_b, out_stride_t, inv_tau, ignore_index,
                        HAS_GLOGP: tl.constexpr, HAS_GENT: tl.constexpr, HAS_ENT: tl.constexpr,
                        R: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
    row_ok = rows < N
    base = logits_ptr + _row_offsets(tl.minimum(rows, N - 1), T, stride_b, stride_t)[:, None]
    out_base = out_ptr + _row_offsets(rows, T, out_stride_b, out_stride_t)[:, None]
    cols = tl.arange(0, BLOCK_V)[None, :]
    y = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
    valid = row_ok & (y != ignore_index)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)[:, None]
    a = tl.zeros([R], tl.float32)
    b = tl.zeros([R], tl.float32)
    if HAS_GLOGP:
        a = tl.load(glogp_ptr + rows, mask=row_ok, other=0.0) * inv_tau
    if HAS_GENT:
        b = tl.load(gent_ptr + rows, mask=row_ok, other=0.0) * inv_tau
    a = tl.where(valid, a, 0.0)[:, None]
    b = tl.where(valid, b, 0.0)[:, None]
    h = tl.zeros([R, 1], tl.float32)
    if HAS_GENT:
        if HAS_ENT:
            h = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)[:, None]
        else:
            acc = tl.zeros([R, BLOCK_V], tl.float32)
            for start in range(0, V, BLOCK_V):
                mask = start + cols < V
                s = tl.load(base + start + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_tau
                lp = tl.maximum(s - lse, _MIN_EXP_ARG)
                acc -= tl.where(mask, tl.exp(lp) * lp, 0.0)
            h = tl.maximum(tl.sum(acc, axis=1), 0.0)[:, None]
    y_col = tl.where(valid, y, -1)[:, None]
    for start in range(0, V, BLOCK_V):
        mask = row_ok[:, None] & (start + cols < V)
        s = tl.load(base + start + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_tau
        lp = tl.maximum(s - lse, _MIN_EXP_ARG)
        p = tl.exp(lp)
        g = tl.where(start + cols == y_col, a, 0.0) - p * (a + b * (lp + h))
        tl.store(out_base + start + cols, g.to(out_ptr.dtype.element_ty), mask=mask)


def _row_layout(t: torch.Tensor) -> tuple[int, int, int]:
    """(T, stride_b, stride_t) of a [N, V] or [B, T, V] tensor with unit stride along V."""
    if t.dim() == 2:
        return max(t.size(0), 1), 0, t.stride(0)
    return max(t.size(1), 1), t.stride(0), t.stride(1)


def logprob_forward_triton(logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int,
                           need_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(logp, entropy or None, lse)`` fp32 [N] for logits [N, V] or [B, T, V] (unit stride along V)."""
    V = logits.size(-1)
    N = logits.numel() // max(V, 1)
    logp = torch.empty(N, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if need_entropy else None
    if N == 0:
        return logp, entropy, lse
    T, sb, st = _row_layout(logits)
    R, block_v, warps = logprob_tiling(N, V, triton_interpreting())
    _logprob_fwd_kernel[(triton.cdiv(N, R),)](
        logits, labels, logp, entropy if need_entropy else logp, lse, N, V, T, sb, st, 1.0 / temperature,
        ignore_index, NEED_ENTROPY=need_entropy, R=R, BLOCK_V=block_v, num_warps=warps)
    return logp, entropy, lse


def logprob_backward_triton(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                            grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None, temperature: float,
                            ignore_index: int, out: torch.Tensor, entropy: torch.Tensor | None) -> None:
    """Writes dlogits into ``out`` (same shape as logits, unit stride along V; may be ``logits`` itself)."""
    V = logits.size(-1)
    N = logits.numel() // max(V, 1)
    if N == 0:
        return
    T, sb, st = _row_layout(logits)
    _, osb, ost = _row_layout(out)
    R, block_v, warps = logprob_tiling(N, V, triton_interpreting())
    _logprob_bwd_kernel[(triton.cdiv(N, R),)](
        logits, labels, lse, grad_logp if grad_logp is not None else lse,
        grad_entropy if grad_entropy is not None else lse, entropy if entropy is not None else lse, out,
        N, V, T, sb, st, osb, ost, 1.0 / temperature, ignore_index,
        HAS_GLOGP=grad_logp is not None, HAS_GENT=grad_entropy is not None, HAS_ENT=entropy is not None,
        R=R, BLOCK_V=block_v, num_warps=warps)
