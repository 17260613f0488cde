"""Fused lm_head + log-prob/entropy forward (Triton): logits tiles live in registers only.

Program (i, s) owns ``BLOCK_N`` token rows and the s-th of ``S`` contiguous vocabulary slices. For each
``BLOCK_V`` tile of its slice it builds ``z = h @ W_tile^T (+ b)`` with ``tl.dot`` over ``BLOCK_K`` slices of H
(fp32 accumulator), soft-caps and tempers it (``s = cap(z) / T``) and folds it into online statistics, the
running max starting at -inf::

    m' = max(m, max_j s_j)     d = d e^(m - m') + sum_j e^(s_j - m')     q = q e^(m - m') + sum_j e^(s_j - m') s_j
    s_y picked when the label's column is in the tile

The S partial (m, d, q, s_y) rows are merged in torch (a few [S, N] ops)::

    M = max_s m_s    D = sum_s d_s e^(m_s - M)    lse = M + log D    logp = s_y - lse    H = lse - sum_s q_s e^(m_s - M) / D

Splitting the vocabulary keeps the GPU busy when N / BLOCK_N is small. Rows are a grid axis of size
cdiv(N, BLOCK_N) on axis 0 (no 65,535 limit). Under ``TRITON_INTERPRET=1`` bf16 ``tl.dot`` is wrong
(triton 3.9), so operands are upcast to fp32 there (constexpr ``UPCAST``).

Precision and tiles (``rlhf_fast.kernels.configs.linear_logprob_tile``, chosen from the static kernel report,
``python -m benchmarks kernels``): bf16/fp16 inputs run on tensor cores (HGMMA on sm_90, HMMA on sm_80) with
fp32 accumulation. fp32 inputs follow ``torch.backends.cuda.matmul.allow_tf32``, like the cuBLAS matmuls of
the backward and of torch's own lm_head:

- off (torch's default): IEEE fp32 dots: the reference's fp32 arithmetic up to summation order. There
  is no fp32 tensor-core instruction, so this path is FFMA-bound (~1/15 of the bf16 tensor-core rate on
  H100); its tile is the largest that does not spill (64x128x64 on sm_90: ~205 registers; 64x128x32 on
  sm_80, where K = 64 spills ~250 bytes to local memory).
- on: TF32 tensor cores (operands rounded to 10 mantissa bits, fp32 accumulation): each product carries a
  relative error up to ~2^-10, with random signs, so a logit's error is ~3e-4 x the logits' standard deviation,
  whatever H. Measured by emulating the TF32 rounding against float64 on CPU (H = 4096, V = 32000, 64 tokens):
  logit std 1 -> rms logit error 2.9e-4, max |d logp| 8e-4 nats; std 3 -> 8.8e-4 and 2.1e-3 (H = 1024 the
  same). That is the order of a bf16 model's own logits: fine for rollout and reference log-probs, not where
  fp32 log-probs must match an fp32 reference (keep it off there).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlhf_fast._backend import triton_interpreting
from rlhf_fast.kernels.configs import LinearTile, linear_logprob_tile


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H, s_hn, s_wv, softcap,
                 HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """z[BLOCK_N, BLOCK_V] = cap(h[rows] @ W[cols]^T + b[cols]) in fp32."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + ks
        k_ok = k < H
        h = tl.load(h_ptr + rows[:, None] * s_hn + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * s_wv + k[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        acc = softcap * (2.0 * tl.sigmoid(2.0 * acc / softcap) - 1.0)   # c * tanh(z / c)
    return acc


@triton.jit
def _linear_logprob_fwd_kernel(h_ptr, w_ptr, b_ptr, labels_ptr, m_ptr, d_ptr, q_ptr, sy_ptr,
                               N, V, H, s_hn, s_wv, cols_per_split, inv_t, softcap,
                               HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, NEED_ENTROPY: tl.constexpr,
                               UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    split = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    d = tl.zeros((BLOCK_N,), dtype=tl.float32)
    q = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sy = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_begin = split * cols_per_split
    v_end = tl.minimum(v_begin + cols_per_split, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H, s_hn, s_wv, softcap,
                         HAS_BIAS, HAS_SOFTCAP, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
        s = tl.where(col_ok[None, :], z * inv_t, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))        # finite: every tile has a valid column
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        d = d * alpha + tl.sum(p, axis=1)
        if NEED_ENTROPY:
            q = q * alpha + tl.sum(p * tl.where(col_ok[None, :], s, 0.0), axis=1)
        m = m_new
        sy += tl.sum(tl.where(cols[None, :] == labels[:, None], s, 0.0), axis=1)
    out = split * N + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(d_ptr + out, d, mask=row_ok)
    tl.store(sy_ptr + out, sy, mask=row_ok)
    if NEED_ENTROPY:
        tl.store(q_ptr + out, q, mask=row_ok)


_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _config(hidden: torch.Tensor, V: int) -> tuple[LinearTile, int]:
    """(tile of :func:`rlhf_fast.kernels.configs.linear_logprob_tile`, vocabulary splits)."""
    if triton_interpreting():
        tile, target = linear_logprob_tile(_DTYPES[hidden.dtype], None), 1
    else:
        props = torch.cuda.get_device_properties(hidden.device)
        tile = linear_logprob_tile(_DTYPES[hidden.dtype], props.major * 10 + props.minor,
                                   allow_tf32=torch.backends.cuda.matmul.allow_tf32)
        target = 4 * props.multi_processor_count
    n_blocks = triton.cdiv(hidden.shape[0], tile.block_n)
    splits = max(1, min(triton.cdiv(target, n_blocks), triton.cdiv(V, tile.block_v)))
    return tile, splits


def linear_logprob_forward_triton(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                  labels: torch.Tensor, temperature: float, ignore_index: int, need_entropy: bool,
                                  softcap: float | None):
    """``(logp [N], entropy [N] or None, lse [N])`` fp32 for hidden [N, H] (unit stride along H), weight [V, H]."""
    N, H = hidden.shape
    V = weight.shape[0]
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    tile, splits = _config(hidden, V)
    cols_per_split = triton.cdiv(triton.cdiv(V, splits), tile.block_v) * tile.block_v
    splits = triton.cdiv(V, cols_per_split)                   # every split owns at least one column
    stats = torch.empty(4, splits, N, dtype=torch.float32, device=hidden.device)
    m, d, q, sy = stats.unbind(0)
    if N:
        _linear_logprob_fwd_kernel[(triton.cdiv(N, tile.block_n), splits)](
            hidden, weight, weight if bias is None else bias, labels, m, d, q, sy,
            N, V, H, hidden.stride(0), weight.stride(0), cols_per_split, 1.0 / temperature,
            1.0 if softcap is None else softcap,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, NEED_ENTROPY=need_entropy,
            UPCAST=triton_interpreting(), DOT_PRECISION=tile.dot_precision,
            BLOCK_N=tile.block_n, BLOCK_V=tile.block_v, BLOCK_K=tile.block_k, num_warps=tile.num_warps)
    big_m = m.max(0).values
    scale = torch.exp(m - big_m)
    denom = (d * scale).sum(0)
    lse = big_m + torch.log(denom)
    valid = labels != ignore_index
    logp = torch.where(valid, (sy.sum(0) - lse).clamp(max=0.0), 0.0)
    entropy = None
    if need_entropy:
        entropy = torch.where(valid, (lse - (q * scale).sum(0) / denom).clamp(min=0.0), 0.0)
    return logp, entropy, lse
