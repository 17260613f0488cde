"""Clipped PPO value loss (the critic's), as in verl ``compute_value_loss`` and OpenRLHF ``ValueLoss``.

Per token, all in fp32 (inputs ``[B, T]``, any float dtype; ``v`` values, ``R`` returns)::

    v_clip = clamp(v, old_values - clip, old_values + clip)        = old + clamp(v - old, -clip, clip)
    l      = 0.5 * max((v - R)^2, (v_clip - R)^2)                  the 0.5 factor of verl/OpenRLHF/TRL
    loss   = sum_{b,t} mask * s_b * l                              s_b: the ``agg`` mode (rlhf_fast.ops.agg)

``clip=None`` disables clipping (``l = 0.5 * (v - R)^2``). Gradient (one pass): ``dloss/dv = g * s_b * m * (v - R)``
where the unclipped branch is the max (ties included, as autograd splits them), else 0.
``agg="none"`` returns the masked ``[B, T]`` matrix ``m * l``.

Stats (0-dim fp32, detached, over the valid tokens; 0 on an all-masked batch): ``vf_clipfrac``
mean[(v_clip - R)^2 > (v - R)^2], ``vpred_mean`` mean(v), ``vf_explained_var`` 1 - Var(R - v) / (Var(R) + 1e-5)
(population variances; verl's critic/vf_explained_var up to the N/(N-1) factor on the 1e-5).

Backends: ``torch`` is the reference (plain autograd); ``native`` (C++) and ``triton`` run one fused kernel
forward (per-row loss sums, counts and stat partials) and one backward (dv per token) in an autograd Function.
"""
from __future__ import annotations

import math

import torch

from rlhf_fast._backend import native_module, resolve_backend
from rlhf_fast._validation import check_choice, check_mask, check_positive, check_same_device, check_same_shape, \
    check_tensor
from rlhf_fast.ops.agg import AGG_MODES, aggregate, row_scale

# Column order of the per-row partials [B, 8] the fused forward kernels write (e = R - v).
VALUE_PARTS = ("loss_sum", "count", "clip", "v_sum", "r_sum", "r_sq_sum", "e_sum", "e_sq_sum")
EXPLAINED_VAR_EPS = 1e-5


# ----------------------------------------------------------------------------------------- reference
def value_loss_torch(values, old_values, returns, mask, clip=0.2, agg="token-mean", dtype=torch.float32):
    """Reference: the formulas of the module docstring in ``dtype`` with plain autograd. ``mask`` bool.
    Padded positions are zeroed first, so whatever they hold (even NaN) reaches neither the loss nor the grad."""
    def valid(x):
        return torch.where(mask, x.to(dtype), 0.0)

    v, old, ret = valid(values), valid(old_values), valid(returns)
    l1 = (v - ret) ** 2
    if clip is None:
        l2 = l1
    else:
        l2 = (torch.clamp(v, old - clip, old + clip) - ret) ** 2
    loss = 0.5 * aggregate(torch.maximum(l1, l2), mask, agg)

    n = mask.sum().clamp(min=1)

    def mean(x):
        return torch.where(mask, x.detach().to(dtype), 0.0).sum() / n

    def var(x):
        x = x.detach()
        return torch.where(mask, (x - mean(x)) ** 2, 0.0).sum() / n

    err = (ret - v).detach()
    stats = {
        "vf_clipfrac": mean(l2 > l1),
        "vpred_mean": mean(v),
        "vf_explained_var": torch.where(mask.any(), 1 - var(err) / (var(ret) + EXPLAINED_VAR_EPS), 0.0),
    }
    return loss, stats


# ----------------------------------------------------------------------------------------- fused path
class _FusedValueLoss(torch.autograd.Function):
    """Outputs (loss, parts): loss a scalar (or [B, T] for agg="none"), parts the [B, 8] partials (no grad)."""

    @staticmethod
    def forward(ctx, values, old_values, returns, mask, clip, agg, backend):
        if backend == "native":
            parts, token_loss = native_module().value_loss_forward(values, old_values, returns, mask, clip,
                                                                   agg == "none")
        else:
            from rlhf_fast.kernels.value_loss import value_loss_forward_triton
            parts, token_loss = value_loss_forward_triton(values, old_values, returns, mask, clip, agg == "none")
        scale = row_scale(parts[:, 1], values.shape[1], agg)
        loss = token_loss if agg == "none" else (scale * parts[:, 0]).sum()
        ctx.save_for_backward(values, old_values, returns, mask, scale)
        ctx.clip, ctx.agg, ctx.backend = clip, agg, backend
        ctx.mark_non_differentiable(parts)
        return loss, parts

    @staticmethod
    def backward(ctx, grad_loss, _grad_parts):
        values, old_values, returns, mask, scale = ctx.saved_tensors
        coef = grad_loss.contiguous() if ctx.agg == "none" else (grad_loss * scale).contiguous()
        if ctx.backend == "native":
            grad = native_module().value_loss_backward(values, old_values, returns, mask, coef, ctx.clip)
        else:
            from rlhf_fast.kernels.value_loss import value_loss_backward_triton
            grad = value_loss_backward_triton(values, old_values, returns, mask, coef, ctx.clip)
        return grad, None, None, None, None, None, None


def _stats_from_parts(parts: torch.Tensor) -> dict[str, torch.Tensor]:
    tot = parts.sum(0)
    n = tot[1].clamp(min=1)
    var_r = (tot[5] / n - (tot[4] / n) ** 2).clamp(min=0)
    var_e = (tot[7] / n - (tot[6] / n) ** 2).clamp(min=0)
    return {
        "vf_clipfrac": tot[2] / n,
        "vpred_mean": tot[3] / n,
        "vf_explained_var": torch.where(tot[1] > 0, 1 - var_e / (var_r + EXPLAINED_VAR_EPS), 0.0),
    }


# ----------------------------------------------------------------------------------------- public op
def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float | None = 0.2, agg: str = "token-mean",
                   backend: str = "auto") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO value loss and its stats; see the module docstring. Inputs ``[B, T]``.

    Returns ``(loss, stats)``: loss a 0-dim fp32 tensor differentiable w.r.t. ``values`` (``[B, T]`` for
    ``agg="none"``), stats a dict of detached 0-dim fp32 tensors.
    """
    check_tensor("values", values, floating=True, ndim=2)
    for name, t in (("old_values", old_values), ("returns", returns)):
        check_tensor(name, t, floating=True)
        check_same_shape(name, t, "values", values)
    mask = check_mask("mask", mask, values.shape)
    check_same_device({"values": values, "old_values": old_values, "returns": returns, "mask": mask})
    clip = check_positive("clip", clip, allow_none=True)
    check_choice("agg", agg, AGG_MODES)
    backend = resolve_backend(backend, values)
    if backend == "torch":
        return value_loss_torch(values, old_values, returns, mask, clip, agg)
    inputs = [t.detach().contiguous() for t in (old_values, returns, mask)]
    loss, parts = _FusedValueLoss.apply(values.contiguous(), *inputs, math.inf if clip is None else clip, agg,
                                        backend)
    return loss, _stats_from_parts(parts)
