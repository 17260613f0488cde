"""Clipped PPO policy loss (Schulman et al. 2017) with dual clip and truncated importance sampling.

Per token, all in fp32 (inputs ``[B, T]``, any float dtype; ``A`` = advantages)::

    r     = exp(clamp(logp - old_logp, -20, 20))                               ratio (clamped like verl/OpenRLHF)
    pg    = max(-A * r, -A * clamp(r, 1 - clip_low, 1 + clip_high))           clipped surrogate
    pg    = min(pg, -A * dual_clip)              where A < 0                  dual clip (Ye et al. 2020), dual_clip > 1
    w     = min(exp(clamp(old_logp - rollout_logp, -20, 20)), tis_cap)        truncated IS (Yao et al. 2025), detached;
    pg    = w * pg                                                            only when rollout_logp is given
    pg    = weight * pg                                                       only when weight is given (detached)
    loss  = sum_{b,t} mask * s_b * pg                                         s_b: the ``agg`` mode (rlhf_fast.ops.agg)

``weight`` is any per-token multiplier (precomputed IS weights, 0/1 token filters): it scales a token's loss and
gradient but not the normalisation (``s_b`` counts the tokens of ``mask``), so a weight of 0 drops the token's
contribution exactly. Gradient: ``dloss/dlogp = -g * s_b * m * weight * w * A * r`` where neither clip is
active and ``|logp - old_logp| <= 20``, else 0. ``agg="none"`` returns the masked ``[B, T]`` matrix ``m * pg``.

Stats (0-dim fp32, detached; means over the valid tokens, 0 on an all-masked batch):
``clipfrac`` mean[-A*clamp(r) > -A*r] (verl pg_clipfrac), ``clipfrac_lower`` mean[A < 0 and the dual clip is active],
``approx_kl`` mean(old_logp - logp) (verl ppo_kl, k1 on the clamped log-ratio), ``ratio_mean/max/min``;
with rollout_logp also ``tis_weight_mean`` mean(w) and ``tis_clipfrac`` mean[exp(old - rollout) > tis_cap].

Backends: ``torch`` is the reference (plain autograd); ``native`` (C++) and ``triton`` run one fused kernel
forward (per-row loss sums, counts and stat partials) in an autograd Function. Backward: triton recomputes dlogp
per token in a second kernel from the saved inputs; native has its forward also write ``m * dpg/dlogp`` per token
(fp32 ``[B, T]``, only when logp requires grad), so its backward is one multiply by ``g * s_b``.
"""
from __future__ import annotations

import math

import torch

from rlhf_fast._backend import native_module, resolve_backend
from rlhf_fast._validation import check_choice, check_in_range, check_mask, check_same_device, check_same_shape, \
    check_tensor
from rlhf_fast.ops.agg import AGG_MODES, aggregate, row_scale

LOG_RATIO_BOUND = 20.0
_NO_DUAL_CLIP = 1e30
# Column order of the per-row partials [B, 10] the fused forward kernels write.
POLICY_PARTS = ("loss_sum", "count", "clip", "clip_lower", "neg_log_ratio", "ratio_sum", "ratio_max", "ratio_min",
                "tis_sum", "tis_clip")


# ----------------------------------------------------------------------------------------- reference
def tis_weight(old_logp: torch.Tensor, rollout_logp: torch.Tensor, tis_cap: float | None) -> torch.Tensor:
    """Truncated-IS weight ``min(exp(clamp(old_logp - rollout_logp, -20, 20)), tis_cap)``, detached (uncapped for
    ``tis_cap=None``); in the inputs' dtype."""
    w = torch.exp(torch.clamp(old_logp - rollout_logp, -LOG_RATIO_BOUND, LOG_RATIO_BOUND)).detach()
    return w if tis_cap is None else torch.clamp(w, max=tis_cap)


def policy_loss_torch(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=0.2, dual_clip=None,
                      agg="token-mean", rollout_logp=None, tis_cap=None, weight=None, dtype=torch.float32):
    """Reference: the formulas of the module docstring in ``dtype`` with plain autograd. ``mask`` bool.
    Padded positions are zeroed first, so whatever they hold (even NaN) reaches neither the loss nor the grad."""
    def valid(x):
        return torch.where(mask, x.to(dtype), 0.0)

    logp, old, adv = valid(logp), valid(old_logp), valid(advantages)
    log_ratio = torch.clamp(logp - old, -LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    pg = torch.maximum(pg1, pg2)
    dual_active = torch.zeros_like(mask)
    if dual_clip is not None:
        pg3 = -adv * dual_clip
        dual_active = (adv < 0) & (pg > pg3)
        pg = torch.where(adv < 0, torch.minimum(pg, pg3), pg)
    if rollout_logp is not None:
        w_raw = tis_weight(old, valid(rollout_logp), None)
        w = w_raw if tis_cap is None else torch.clamp(w_raw, max=tis_cap)
        pg = pg * w
    if weight is not None:
        pg = pg * valid(weight).detach()
    loss = aggregate(pg, mask, agg)

    def mean(x):
        return torch.where(mask, x.detach().to(dtype), 0.0).sum() / mask.sum().clamp(min=1)

    valid = mask.any()
    r = ratio.detach()
    stats = {
        "clipfrac": mean(pg2 > pg1),
        "clipfrac_lower": mean(dual_active),
        "approx_kl": mean(-log_ratio),
        "ratio_mean": mean(r),
        "ratio_max": torch.where(valid, torch.where(mask, r, -math.inf).max(), 0.0),
        "ratio_min": torch.where(valid, torch.where(mask, r, math.inf).min(), 0.0),
    }
    if rollout_logp is not None:
        stats["tis_weight_mean"] = mean(w)
        stats["tis_clipfrac"] = mean(w_raw > (math.inf if tis_cap is None else tis_cap))
    return loss, stats


# ----------------------------------------------------------------------------------------- fused path
def _launch_forward(backend, tensors, params, token_out, grad_out):
    """(parts, token_loss, dtok); dtok (native only, when grad_out) is the per-token ``m * d pg / d logp``."""
    if backend == "native":
        return native_module().policy_loss_forward(*tensors, *params, token_out, grad_out)
    from rlhf_fast.kernels.policy_loss import policy_loss_forward_triton
    return (*policy_loss_forward_triton(*tensors, *params, token_out), None)


class _FusedPolicyLoss(torch.autograd.Function):
    """Outputs (loss, parts): loss a scalar (or [B, T] for agg="none"), parts the [B, 10] partials (no grad).

    native: the forward kernel also writes the per-token derivative ``dtok`` (one fp32 [B, T] write) and the
    backward is ``coef * dtok``. triton: the backward kernel recomputes it from the saved inputs."""

    @staticmethod
    def forward(ctx, logp, old_logp, advantages, mask, rollout_logp, weight, params, agg, backend):
        tensors = (logp, old_logp, advantages, mask, rollout_logp, weight)
        ctx.stashed = backend == "native" and ctx.needs_input_grad[0]
        parts, token_loss, dtok = _launch_forward(backend, tensors, params, agg == "none", ctx.stashed)
        scale = row_scale(parts[:, 1], logp.shape[1], agg)
        loss = token_loss if agg == "none" else (scale * parts[:, 0]).sum()
        if ctx.stashed:
            ctx.save_for_backward(dtok, mask, scale)
        else:
            ctx.save_for_backward(*tensors[:4], *(t for t in tensors[4:] if t is not None), scale)
        ctx.has_tis, ctx.has_weight = rollout_logp is not None, weight is not None
        ctx.params, ctx.agg, ctx.backend = params, agg, backend
        ctx.logp_dtype = logp.dtype
        ctx.mark_non_differentiable(parts)
        return loss, parts

    @staticmethod
    def backward(ctx, grad_loss, _grad_parts):
        if ctx.stashed:
            dtok, mask, scale = ctx.saved_tensors
            if ctx.agg == "none":  # the upstream grad of padded tokens may be anything (even NaN): not used
                grad = torch.where(mask, grad_loss, 0.0) * dtok
            else:
                grad = dtok * (grad_loss * scale)[:, None]
            return grad.to(ctx.logp_dtype), *([None] * 8)
        *saved, scale = ctx.saved_tensors
        optional = iter(saved[4:])
        tensors = (*saved[:4], next(optional) if ctx.has_tis else None, next(optional) if ctx.has_weight else None)
        coef = grad_loss.contiguous() if ctx.agg == "none" else (grad_loss * scale).contiguous()
        from rlhf_fast.kernels.policy_loss import policy_loss_backward_triton
        grad = policy_loss_backward_triton(*tensors, coef, *ctx.params)
        return grad, *([None] * 8)


def _stats_from_parts(parts: torch.Tensor, has_tis: bool) -> dict[str, torch.Tensor]:
    tot = parts.sum(0)
    n = tot[1].clamp(min=1)
    valid = tot[1] > 0
    stats = {
        "clipfrac": tot[2] / n,
        "clipfrac_lower": tot[3] / n,
        "approx_kl": tot[4] / n,
        "ratio_mean": tot[5] / n,
        "ratio_max": torch.where(valid, parts[:, 6].max(), 0.0),
        "ratio_min": torch.where(valid, parts[:, 7].min(), 0.0),
    }
    if has_tis:
        stats["tis_weight_mean"] = tot[8] / n
        stats["tis_clipfrac"] = tot[9] / n
    return stats


# ----------------------------------------------------------------------------------------- public op
def check_clip_args(clip_low, clip_high, dual_clip, tis_cap, rollout_logp) -> tuple[float, float]:
    """The clipped loss's scalar arguments (0 <= clip_low <= 1, clip_high >= 0, dual_clip None or > 1, tis_cap
    > 0 with rollout_logp); returns (clip_low, clip_high) as checked."""
    clip_low = check_in_range("clip_low", clip_low, 0.0, 1.0)
    clip_high = check_in_range("clip_high", clip_high, 0.0, math.inf)
    if dual_clip is not None and not (isinstance(dual_clip, (int, float)) and dual_clip > 1):
        raise ValueError(f"dual_clip must be None or a number > 1, got {dual_clip!r}")
    if tis_cap is not None:
        if rollout_logp is None:
            raise ValueError("tis_cap needs rollout_logp (the truncated IS weight is exp(old_logp - rollout_logp))")
        check_in_range("tis_cap", tis_cap, 1e-30, math.inf)
    return clip_low, clip_high


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip_low: float = 0.2, clip_high: float = 0.2, dual_clip: float | None = None,
                    agg: str = "token-mean", rollout_logp: torch.Tensor | None = None, tis_cap: float | None = None,
                    weight: torch.Tensor | None = None, backend: str = "auto") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO policy loss and its stats; see the module docstring. Inputs ``[B, T]``.

    Returns ``(loss, stats)``: loss a 0-dim fp32 tensor differentiable w.r.t. ``logp`` (``[B, T]`` for
    ``agg="none"``), stats a dict of detached 0-dim fp32 tensors.
    """
    check_tensor("logp", logp, floating=True, ndim=2)
    for name, t in (("old_logp", old_logp), ("advantages", advantages)):
        check_tensor(name, t, floating=True)
        check_same_shape(name, t, "logp", logp)
    for name, t in (("rollout_logp", rollout_logp), ("weight", weight)):
        if t is not None:
            check_tensor(name, t, floating=True)
            check_same_shape(name, t, "logp", logp)
    mask = check_mask("mask", mask, logp.shape)
    check_same_device({"logp": logp, "old_logp": old_logp, "advantages": advantages, "mask": mask,
                       "rollout_logp": rollout_logp, "weight": weight})
    clip_low, clip_high = check_clip_args(clip_low, clip_high, dual_clip, tis_cap, rollout_logp)
    check_choice("agg", agg, AGG_MODES)
    backend = resolve_backend(backend, logp)
    if backend == "torch":
        return policy_loss_torch(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip, agg,
                                 rollout_logp, tis_cap, weight)
    # A disabled dual clip is 1e30 (not inf: -A * inf is NaN at A = 0); it never binds as the ratio is <= e^20.
    params = (clip_low, clip_high, _NO_DUAL_CLIP if dual_clip is None else float(dual_clip),
              math.inf if tis_cap is None else float(tis_cap))
    inputs = [t.detach().contiguous() if t is not None else None
              for t in (old_logp, advantages, mask, rollout_logp, weight)]
    loss, parts = _FusedPolicyLoss.apply(logp.contiguous(), *inputs, params, agg, backend)
    return loss, _stats_from_parts(parts, rollout_logp is not None)
