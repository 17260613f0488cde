"""Policy losses by name: ``POLICY_LOSSES[name](logp, old_logp, advantages, mask, cfg, agg, rollout_logp, weight)``.

Inputs ``[B, T]``; ``cfg`` any object with the PPOConfig fields named below; ``rollout_logp`` the engine's
log-probs (truncated IS when ``cfg.tis_cap`` is set), ``weight`` an optional per-token multiplier (detached).
Returns ``(loss, stats)`` as :func:`rlhf_fast.ops.ppo_policy_loss`, aggregated by ``agg`` over ``mask``::

    vanilla  r_t = exp(logp_t - old_t)                                        clipped PPO (+ dual clip), token ratio
             pg_t = max(-A r_t, -A clamp(r_t, 1 - clip_low, 1 + clip_high))  [min(., -A dual_clip) where A < 0]
    gspo     s_b = exp(mean_t (logp - old))  over row b's valid tokens      GSPO (Zheng et al. 2025), sequence ratio
             s_bt = sg(s_b) * exp(logp_t - sg(logp_t))                       value s_b, d s_bt / d logp_t = s_b
             pg_t = max(-A s_bt, -A clamp(s_bt, 1 - gspo_clip_low, 1 + gspo_clip_high))
    both     pg_t <- w_t * pg_t,  w_t = weight_t * min(exp(old_t - rollout_t), tis_cap)   (the factors present)

GSPO's clip range is its own (the paper: 3e-4 / 4e-4): a sequence ratio sits much closer to 1 than token ratios.
With ``agg="seq-mean-token-mean"`` and a per-sequence advantage, GSPO-token's loss and gradient are the paper's
sequence-level objective ``-(1/S) sum_b min(s_b A_b, clip(s_b) A_b)``. A new loss is one decorated function.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from rlhf_fast import ops
from rlhf_fast.ops.agg import aggregate
from rlhf_fast.ops.policy_loss import LOG_RATIO_BOUND, tis_weight

PolicyLossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
POLICY_LOSSES: dict[str, PolicyLossFn] = {}


def register_policy_loss(name: str):
    """Decorator adding ``fn(logp, old_logp, advantages, mask, cfg, agg, rollout_logp=None, weight=None)``."""
    def deco(fn: PolicyLossFn) -> PolicyLossFn:
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} is already registered")
        POLICY_LOSSES[name] = fn
        return fn
    return deco


def get_policy_loss(name: str) -> PolicyLossFn:
    if name not in POLICY_LOSSES:
        raise ValueError(f"policy_loss must be one of {sorted(POLICY_LOSSES)}, got {name!r}")
    return POLICY_LOSSES[name]


@register_policy_loss("vanilla")
def vanilla_policy_loss(logp, old_logp, advantages, mask, cfg, agg, rollout_logp=None, weight=None):
    return ops.ppo_policy_loss(logp, old_logp, advantages, mask, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                               dual_clip=cfg.dual_clip, agg=agg, rollout_logp=rollout_logp, tis_cap=cfg.tis_cap,
                               weight=weight)


@register_policy_loss("gspo")
def gspo_policy_loss(logp, old_logp, advantages, mask, cfg, agg, rollout_logp=None, weight=None):
    mask = mask.bool()
    logp = torch.where(mask, logp.float(), 0.0)
    old = torch.where(mask, old_logp.float(), 0.0)
    adv = torch.where(mask, advantages.float(), 0.0)
    n = mask.sum(-1, keepdim=True).clamp(min=1)
    log_s = ((logp - old).detach().sum(-1, keepdim=True) / n).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    ratio = torch.exp(log_s + logp - logp.detach())                                   # [B, T], value s_b
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1 - cfg.gspo_clip_low, 1 + cfg.gspo_clip_high)
    pg = torch.maximum(pg1, pg2)
    w = None if rollout_logp is None or cfg.tis_cap is None else tis_weight(old, rollout_logp.float(), cfg.tis_cap)
    if weight is not None:
        w = weight.float() if w is None else w * weight.float()
    loss = aggregate(pg if w is None else pg * w.detach(), mask, agg)
    r = ratio.detach()
    tokens = mask.sum().clamp(min=1)

    def mean(x):
        return torch.where(mask, x.float(), 0.0).sum() / tokens

    stats = {"clipfrac": mean(pg2 > pg1), "clipfrac_lower": logp.new_zeros(()), "approx_kl": mean((old - logp).detach()),
             "ratio_mean": mean(r),
             "ratio_max": torch.where(mask.any(), torch.where(mask, r, -math.inf).max(), 0.0),
             "ratio_min": torch.where(mask.any(), torch.where(mask, r, math.inf).min(), 0.0)}
    return loss, stats
