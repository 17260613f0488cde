"""Drop-ins for OpenRLHF 0.11.2: ``openrlhf.models.utils`` (``compute_approx_kl``, ``compute_reward``),
``openrlhf.models.loss`` (``PolicyLoss``, ``ValueLoss``) and the experience maker's
``get_advantages_and_returns`` (a method there; a function here, without ``self``).

Same signatures and return structure; outputs fp32. Differences, all on degenerate input: an all-masked
batch gives a loss of 0 (OpenRLHF: NaN); ``ppo_kl`` averages the log-ratio clamped to [-20, 20] (the
clamp OpenRLHF applies to the ratio; its ppo_kl uses the raw log-ratio, so they differ only past 20 nats).
Not accelerated (ValueError/NotImplementedError): ``policy_loss_type="gspo"``, list-valued (packed) ``kl``.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

from rlhf_fast._validation import check_choice, check_mask, check_tensor
from rlhf_fast.ops.agg import global_batch_scale
from rlhf_fast.ops.gae import gae
from rlhf_fast.ops.kl import kl_penalty
from rlhf_fast.ops.masked import masked_mean
from rlhf_fast.ops.policy_loss import ppo_policy_loss
from rlhf_fast.ops.value_loss import ppo_value_loss

__all__ = ["compute_approx_kl", "compute_reward", "get_advantages_and_returns", "PolicyLoss", "ValueLoss"]

KL_CLAMP = 10.0            # OpenRLHF clamps every estimator's value to [-10, 10]
KL_IS_WEIGHT_CLIP = 10.0   # and the importance weight of unbiased_gradient to <= 10


def compute_approx_kl(log_probs: torch.Tensor, log_probs_base: torch.Tensor,
                      log_probs_old: Optional[torch.Tensor] = None, kl_estimator: str = "k1",
                      unbiased_gradient: bool = False) -> torch.Tensor:
    """Per-token k1 / k2 / k3 of ``x = log_probs - log_probs_base``, clamped to [-10, 10].

    ``unbiased_gradient``: same value, gradient ``w * x`` (k2's) with ``w = min(exp(log_probs - log_probs_old), 10)``
    detached (``w = 1`` without ``log_probs_old``): the straight-through ``"+"`` estimators of rlhf_fast.ops.kl.
    """
    check_choice("kl_estimator", kl_estimator, ("k1", "k2", "k3"))
    if not unbiased_gradient:
        return kl_penalty(log_probs, log_probs_base, kl_estimator, clamp=KL_CLAMP)
    kl = kl_penalty(log_probs, log_probs_base, kl_estimator + "+", clamp=KL_CLAMP)
    if log_probs_old is None:
        return kl
    w = (log_probs.detach().float() - log_probs_old.float()).exp().clamp(max=KL_IS_WEIGHT_CLIP)
    return kl.detach() + w * (kl - kl.detach())


def compute_reward(r: Union[torch.Tensor, float], kl_coef: float, kl: Union[torch.Tensor, list[torch.Tensor]],
                   action_mask: Optional[torch.Tensor] = None,
                   reward_clip_range: Tuple[float, float] = None) -> Union[torch.Tensor, list[torch.Tensor]]:
    """``-max(kl_coef, 0) * kl`` at every position, plus ``clamp(r[b], *reward_clip_range)`` at the last valid
    token of row b (position T-1 for a fully masked row, as OpenRLHF). ``[B, T]`` fp32.

    The KL term is not masked (OpenRLHF masks it later, in GAE). To build rewards straight from log-probs in
    one fused pass, use ``rlhf_fast.ops.shape_rewards``.
    """
    if isinstance(kl, (list, tuple)):
        raise NotImplementedError("list-valued (packed) kl is not supported; pass a [B, T] tensor")
    check_tensor("kl", kl, floating=True, ndim=2)
    check_tensor("r", r, floating=True, ndim=1)
    if action_mask is None:
        raise ValueError("action_mask is required (OpenRLHF finds the last response token from it)")
    mask = check_mask("action_mask", action_mask, kl.shape)
    if reward_clip_range:
        r = r.clamp(min=reward_clip_range[0], max=reward_clip_range[1])
    last = kl.shape[1] - 1 - mask.flip(-1).long().argmax(-1, keepdim=True)
    return (-max(kl_coef, 0.0) * kl.float()).scatter_add(1, last, r.float().unsqueeze(1))


def get_advantages_and_returns(values: torch.Tensor, rewards: torch.Tensor, action_mask: torch.Tensor,
                               gamma: float, lambd: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """GAE as OpenRLHF: values and rewards are multiplied by the mask, then the recursion runs over EVERY
    position (no skipping), ``returns = advantages + masked values``. ``[B, T]`` fp32 each.

    That is ``rlhf_fast.ops.gae`` on the masked inputs with an all-valid mask (identical to the mask-aware
    ``gae`` for right-padded rows, OpenRLHF's layout).
    """
    if action_mask is not None:
        mask = check_mask("action_mask", action_mask, rewards.shape)
        values, rewards = values.float() * mask, rewards.float() * mask
    everywhere = torch.ones(rewards.shape, dtype=torch.bool, device=rewards.device)
    return gae(rewards, values, everywhere, float(gamma), float(lambd))


def _aggregation(token_level_loss: bool, mask, dp_size, batch_num_tokens, global_batch_size):
    """(rlhf_fast agg mode, global rescale) of OpenRLHF's ``aggregate_loss``: a missing global total means the
    local mean whatever ``dp_size``."""
    agg = "token-mean" if token_level_loss else "seq-mean-token-mean"
    total = batch_num_tokens if token_level_loss else global_batch_size
    return agg, global_batch_scale(mask, agg, dp_size if total is not None else 1, batch_num_tokens,
                                   global_batch_size)


def _mask_or_ones(action_mask, like: torch.Tensor) -> torch.Tensor:
    if action_mask is None:
        return torch.ones(like.shape, dtype=torch.bool, device=like.device)
    return check_mask("action_mask", action_mask, like.shape)


class PolicyLoss(nn.Module):
    """OpenRLHF's PPO policy loss (``policy_loss_type="ppo"``), one fused pass forward and backward.

    ``forward`` returns ``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)``; the last two are None unless
    the train/rollout correction is on (``is_correction_level`` "token" or "seq"), whose per-token weight (the
    gated IS ratio) is applied inside the fused loss.
    """

    def __init__(self, clip_eps_low: float = 0.2, clip_eps_high: float = 0.2, dual_clip: float = None,
                 token_level_loss: bool = True, policy_loss_type: str = "ppo", is_correction_level: str = "off",
                 is_correction_mode: str = "mask", is_correction_gating: str = "ratio",
                 is_correction_threshold: list = (0.5, 5.0)) -> None:
        super().__init__()
        if policy_loss_type != "ppo":
            raise NotImplementedError(f"policy_loss_type={policy_loss_type!r}: only 'ppo' is accelerated")
        if dual_clip is not None and not dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1.0, got {dual_clip}")
        check_choice("is_correction_level", is_correction_level, ("off", "token", "seq"))
        check_choice("is_correction_mode", is_correction_mode, ("mask", "clip"))
        check_choice("is_correction_gating", is_correction_gating, ("ratio", "binary_kl", "tv"))
        if is_correction_mode == "clip" and (is_correction_level == "seq" or is_correction_gating != "ratio"):
            raise ValueError("is_correction_mode=clip requires is_correction_level=token and is_correction_gating=ratio")
        if is_correction_gating != "ratio" and is_correction_level != "off" and is_correction_threshold[0] > 0:
            raise ValueError(f"is_correction_gating={is_correction_gating} takes an upper bound only (a single delta)")
        self.clip_eps_low, self.clip_eps_high, self.dual_clip = clip_eps_low, clip_eps_high, dual_clip
        self.token_level_loss, self.policy_loss_type = token_level_loss, policy_loss_type
        self.is_correction_level, self.is_correction_mode = is_correction_level, is_correction_mode
        self.is_correction_gating, self.is_correction_threshold = is_correction_gating, is_correction_threshold

    def _correction(self, old_log_probs, rollout_log_probs, mask):
        """OpenRLHF's gated train/rollout IS weight per token (detached) and the filtered-unit indicator."""
        low, high = self.is_correction_threshold
        seq_level = self.is_correction_level == "seq"
        old, rollout = old_log_probs.detach().float(), rollout_log_probs.detach().float()
        token_is = (old - rollout).exp()
        if self.is_correction_gating == "ratio":
            stat = old - rollout
        else:
            p, q = rollout.exp().clamp(1e-6, 1 - 1e-6), old.exp().clamp(1e-6, 1 - 1e-6)
            if self.is_correction_gating == "binary_kl":
                stat = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
            else:
                stat = (p - q).abs()
        if seq_level:
            stat = (stat * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True)
        if self.is_correction_gating == "ratio":
            stat = stat.exp()
        if self.is_correction_mode == "clip":
            return stat.clamp(min=low, max=high), (stat < low) | (stat > high)
        keep = (stat >= low) & (stat <= high)
        return torch.where(keep, token_is, 0.0), ~keep

    def forward(self, log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                action_mask: Optional[torch.Tensor] = None, rollout_log_probs: Optional[torch.Tensor] = None,
                dp_size: int = 1, batch_num_tokens: Optional[float] = None,
                global_batch_size: Optional[float] = None) -> torch.Tensor:
        mask = _mask_or_ones(action_mask, log_probs)
        agg, scale = _aggregation(self.token_level_loss, mask, dp_size, batch_num_tokens, global_batch_size)
        vllm_kl = is_filter_ratio = coef = None
        if self.is_correction_level != "off":
            if rollout_log_probs is None:
                raise ValueError(f"rollout_log_probs is required when is_correction_level={self.is_correction_level!r}")
            coef, filtered = self._correction(old_log_probs, rollout_log_probs, mask)
            coef = coef.detach().float()      # the op's per-token weight (0 drops a token exactly)
            filtered = filtered.float()
            is_filter_ratio = filtered.mean() if self.is_correction_level == "seq" else masked_mean(filtered, mask)
            vllm_kl = masked_mean(rollout_log_probs.float() - old_log_probs.float(), mask)
        loss, stats = ppo_policy_loss(log_probs, old_log_probs, advantages, mask, self.clip_eps_low,
                                      self.clip_eps_high, self.dual_clip, agg, weight=coef)
        return loss * scale, stats["clipfrac"], stats["approx_kl"], vllm_kl, is_filter_ratio


class ValueLoss(nn.Module):
    """OpenRLHF's value loss: ``0.5 * agg(max((clip(v) - R)^2, (v - R)^2))`` with ``clip(v) = old_v +
    clamp(v - old_v, -clip_eps, clip_eps)``, or ``0.5 * agg((v - R)^2)`` when ``clip_eps`` is None."""

    def __init__(self, clip_eps: float = None, token_level_loss: bool = True) -> None:
        super().__init__()
        self.clip_eps = clip_eps
        self.token_level_loss = token_level_loss

    def forward(self, values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                action_mask: Optional[torch.Tensor] = None, dp_size: int = 1,
                batch_num_tokens: Optional[float] = None, global_batch_size: Optional[float] = None) -> torch.Tensor:
        mask = _mask_or_ones(action_mask, values)
        agg, scale = _aggregation(self.token_level_loss, mask, dp_size, batch_num_tokens, global_batch_size)
        loss, _ = ppo_value_loss(values, old_values, returns, mask, clip=self.clip_eps, agg=agg)
        return loss * scale
