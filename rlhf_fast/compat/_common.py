"""Conventions two or more peers share, expressed on top of rlhf_fast.ops.

``global_batch_scale``: verl's ``agg_loss`` and OpenRLHF's ``aggregate_loss`` normalise by GLOBAL batch
totals (data-parallel invariance) where rlhf_fast.ops.agg normalises by the local ones. Every mode is
``loss = sum_b s_b * rowsum_b``; the peers' global form differs from ours by one scalar factor::

    token-mean                 dp_size * N_local / batch_num_tokens           (N: valid tokens)
    token-sum                  dp_size
    seq-mean-token-sum|-mean   dp_size * S_local / global_batch_size          (S: rows with a valid token)
    seq-mean-token-sum-norm    as above, times T / loss_scale_factor          (T: the mask's width)

An omitted total means the local one (factor 1 before ``dp_size``), which the peers allow only when
``dp_size == 1``. ``N_local``/``S_local`` count as at least 1, as in rlhf_fast.ops.agg.

``whiten_everywhere``: TRL's and verl's ``masked_whiten`` take global statistics over the valid entries
but return ``(x - mean) * rsqrt(var_unbiased + 1e-8)`` at EVERY position, padding included, whereas
``rlhf_fast.ops.masked_whiten`` writes 0 at masked positions.
"""
from __future__ import annotations

import torch

from rlhf_fast.ops.masked import masked_mean, masked_var

GLOBAL_BATCH_KEYS = ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")


def global_batch_scale(mask: torch.Tensor, agg: str, dp_size: int = 1, batch_num_tokens=None,
                       global_batch_size=None, loss_scale_factor=None):
    """Factor turning ``rlhf_fast.ops.agg`` mode ``agg`` on ``mask`` (bool ``[B, T]``) into the peers' global
    normalisation (see the module docstring). A Python float when no local count is needed, else a 0-dim tensor."""
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
        scale = local.clamp(min=1).float() * (dp_size / float(total))
    if agg == "seq-mean-token-sum-norm" and loss_scale_factor is not None:
        scale = scale * (mask.shape[-1] / float(loss_scale_factor))
    return scale


def whiten_everywhere(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``(values - mean) * rsqrt(var + 1e-8)`` (``+ mean`` if not ``shift_mean``) at every position, with the
    global mean and unbiased variance of the entries where ``mask`` is set; fp32. Differentiable."""
    mean = masked_mean(values, mask)
    out = (values.float() - mean) * torch.rsqrt(masked_var(values, mask, unbiased=True) + 1e-8)
    return out + mean if not shift_mean else out
