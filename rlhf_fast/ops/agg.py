"""Loss aggregation modes (verl ``agg_loss``, v0.9.1), written as per-token weights.

Every mode is linear in the per-token loss ``l[b, t]``, so ``loss = sum_{b,t} w[b, t] * l[b, t]`` with
``w[b, t] = m[b, t] * s[b]``: a per-row scale ``s`` that only needs the row counts ``n_b = sum_t m[b, t]``.
With ``N = sum_b n_b`` valid tokens, ``S = #{b : n_b > 0}`` non-empty rows and ``T`` the mask's width::

    "token-mean"               s_b = 1 / N                    sum of valid token losses / valid tokens
    "token-sum"                s_b = 1                        sum of valid token losses
    "seq-mean-token-sum"       s_b = 1 / S                    mean over non-empty rows of per-row sums
    "seq-mean-token-mean"      s_b = 1 / (n_b * S)            mean over non-empty rows of per-row means
    "seq-mean-token-sum-norm"  s_b = 1 / (S * T)              "seq-mean-token-sum" / T (Dr. GRPO's constant norm)
    "none"                                                    no reduction: the [B, T] matrix m * l

Empty denominators count as 1 (an all-masked batch gives loss 0, never NaN; verl returns NaN there).
verl adds 1e-8 to n_b in "seq-mean-token-mean"; we divide by n_b exactly (relative difference 1e-8 / n_b).
The fused kernels produce per-row sums and counts in their single pass, and the scalar loss is
``sum_b s_b * rowsum_b``; their backward writes ``dL/dl[b, t] = g * m[b, t] * s_b``.

Global totals (gradient accumulation, data parallelism). A loss over a batch cut into pieces (micro-batches,
ranks) must use the totals of the WHOLE batch, ``N`` and ``S``, not each piece's: then the pieces' losses add
up to the batch's loss exactly. Every mode differs from its piece-local form by one scalar factor,
``global_batch_scale`` (verl's ``agg_loss`` and OpenRLHF's ``aggregate_loss`` global arguments)::

    token-mean                 dp_size * N_local / batch_num_tokens
    token-sum                  dp_size
    seq-mean-token-sum|-mean   dp_size * S_local / global_batch_size
    seq-mean-token-sum-norm    as above, times T / loss_scale_factor          (T: the mask's width)

An omitted total means the local one (factor 1 before ``dp_size``), allowed only when ``dp_size == 1``;
``N_local``/``S_local`` count as at least 1. ``batch_totals(mask)`` gives ``(N, S)`` of the whole batch, to be
taken before the first piece (the per-row ``n_b`` of "seq-mean-token-mean" is local to its row anyway).
"""
from __future__ import annotations

import torch

AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm",
             "none")
SCALAR_AGG_MODES = AGG_MODES[:-1]       # the modes that reduce to a scalar loss
GLOBAL_BATCH_KEYS = ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")


def row_scale(counts: torch.Tensor, width: int, agg: str) -> torch.Tensor:
    """``s_b`` of the table above from the per-row valid-token counts ``counts`` ``[B]`` (float); same dtype."""
    if agg == "token-mean":
        return (1.0 / counts.sum().clamp(min=1)).expand_as(counts)
    if agg in ("token-sum", "none"):
        return torch.ones_like(counts)
    rows = (counts > 0).sum().to(counts.dtype).clamp(min=1)
    if agg == "seq-mean-token-sum":
        return (1.0 / rows).expand_as(counts)
    if agg == "seq-mean-token-sum-norm":
        return (1.0 / (rows * width)).expand_as(counts)
    if agg == "seq-mean-token-mean":
        return 1.0 / (counts.clamp(min=1) * rows)
    raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")


def aggregate(token_loss: torch.Tensor, mask: torch.Tensor, agg: str) -> torch.Tensor:
    """Reference aggregation of a per-token loss ``[B, T]`` (differentiable; any float dtype); ``mask`` bool."""
    masked = torch.where(mask, token_loss, 0.0)
    if agg == "none":
        return masked
    counts = mask.sum(-1).to(token_loss.dtype)
    return (masked * row_scale(counts, mask.shape[-1], agg)[:, None]).sum()


def batch_totals(mask: torch.Tensor) -> tuple[int, int]:
    """``(N, S)`` of bool ``mask`` ``[B, T]``: valid tokens and rows with at least one valid token."""
    return int(mask.sum()), int(mask.any(-1).sum())


def totals_scale(mask: torch.Tensor, agg: str, totals: tuple[int, ...]):
    """``global_batch_scale`` of the piece ``mask`` by its batch's ``totals``: ``(N, S)``, or ``(N, S, T)`` with T
    the batch's mask width, which keeps "seq-mean-token-sum-norm"'s constant for pieces cut narrower."""
    return global_batch_scale(mask, agg, batch_num_tokens=totals[0], global_batch_size=totals[1],
                              loss_scale_factor=totals[2] if len(totals) > 2 else None)


def global_batch_scale(mask: torch.Tensor, agg: str, dp_size: int = 1, batch_num_tokens=None,
                       global_batch_size=None, loss_scale_factor=None):
    """Factor turning mode ``agg`` on the piece ``mask`` (bool ``[B, T]``) into the normalisation by the global
    totals (see the module docstring). A Python float when no local count is needed, else a 0-dim tensor."""
    if agg == "token-sum":
        return float(dp_size)
    token_level = agg == "token-mean"
    total = batch_num_tokens if token_level else global_batch_size
    if total is None:
        if dp_size > 1:
            name = "batch_num_tokens" if token_level else "global_batch_size"
            raise ValueError(f"(global) {name} is required when dp_size > 1")
        scale = 1.0
    else:
        local = mask.sum() if token_level else mask.any(-1).sum()
        scale = local.clamp(min=1).float() * (dp_size / float(max(total, 1)))
    if agg == "seq-mean-token-sum-norm" and loss_scale_factor is not None:
        scale = scale * (mask.shape[-1] / float(loss_scale_factor))
    return scale
