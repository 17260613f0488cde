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
"""
from __future__ import annotations

import torch

AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm",
             "none")


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
