"""Conventions two or more peers share, expressed on top of rlhf_fast.ops.

(verl's and OpenRLHF's global-batch normalisation is ``rlhf_fast.ops.agg.global_batch_scale``, shared with the
trainer's gradient accumulation.)

``whiten_everywhere``: TRL's and verl's ``masked_whiten`` take global statistics over the valid entries
but return ``(x - mean) * rsqrt(var_unbiased + 1e-8)`` at EVERY position, padding included, whereas
``rlhf_fast.ops.masked_whiten`` writes 0 at masked positions.
"""
from __future__ import annotations

import torch

from rlhf_fast.ops.masked import masked_mean, masked_var


def whiten_everywhere(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``(values - mean) * rsqrt(var + 1e-8)`` (``+ mean`` if not ``shift_mean``) at every position, with the
    global mean and unbiased variance of the entries where ``mask`` is set; fp32. Differentiable."""
    mean = masked_mean(values, mask)
    out = (values.float() - mean) * torch.rsqrt(masked_var(values, mask, unbiased=True) + 1e-8)
    return out + mean if not shift_mean else out
