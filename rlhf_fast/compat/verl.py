"""Drop-ins for ``verl.trainer.ppo.core_algos`` (verl 0.9.1): same names, signatures and return structure.

Swap ``from verl.trainer.ppo import core_algos`` for ``from rlhf_fast.compat import verl as core_algos``
(or import the functions by name). Outputs are fp32 whatever the input dtype (verl keeps the input dtype);
masks may be bool or {0,1}. Differences from verl, all on degenerate input: an all-masked batch gives a
loss of 0 (verl: NaN), and whitening over fewer than two valid tokens gives finite values instead of
verl's ValueError (we do not sync the device to check).

``compute_gae_advantage_return``: verl's loop skips masked positions (they carry the running value and
advantage through) and keeps, at a masked position, the advantage of the next valid position (0 if none);
``returns = advantages + values`` everywhere; the advantages are then whitened over the valid positions
(``masked_whiten``, global unbiased statistics). We run the fused ``rlhf_fast.ops.gae`` and reproduce the
masked positions with a vectorised back-fill, so the outputs match verl at every position.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from rlhf_fast._validation import check_choice, check_mask
from rlhf_fast.compat._common import whiten_everywhere
from rlhf_fast.ops.agg import GLOBAL_BATCH_KEYS, aggregate, global_batch_scale
from rlhf_fast.ops.gae import gae
from rlhf_fast.ops.kl import kl_penalty as _kl_penalty
from rlhf_fast.ops.policy_loss import ppo_policy_loss
from rlhf_fast.ops.value_loss import ppo_value_loss

__all__ = ["compute_gae_advantage_return", "kl_penalty", "agg_loss", "compute_policy_loss",
           "compute_policy_loss_vanilla", "compute_value_loss", "masked_whiten"]

AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
_KL_NAMES = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")
_K3_CLAMP = 10.0                      # verl clamps low_var_kl (k3) to [-10, 10]; the other estimators are unclamped

masked_whiten = whiten_everywhere     # verl.utils.torch_functional.masked_whiten(values, mask, shift_mean=True)


def _fill_from_next_valid(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` at valid positions; at a masked position, ``x`` at the next valid position of the row (0 if none)."""
    T = x.shape[-1]
    pos = torch.arange(T, device=x.device).expand_as(x)
    next_valid = torch.where(mask, pos, T).flip(-1).cummin(-1).values.flip(-1)
    return F.pad(x, (0, 1)).gather(-1, next_valid)


def compute_gae_advantage_return(token_level_rewards: torch.Tensor, values: torch.Tensor,
                                 response_mask: torch.Tensor, gamma, lam):
    """GAE as verl: ``(advantages, returns)``, ``[B, T]`` fp32 each; advantages whitened over ``response_mask``.

    ``gamma``/``lam`` may be floats or 0-dim tensors (verl's annotations say tensors).
    """
    mask = check_mask("response_mask", response_mask, token_level_rewards.shape)
    adv, _ = gae(token_level_rewards, values, mask, float(gamma), float(lam))
    adv = _fill_from_next_valid(adv, mask)
    returns = adv + values.float()
    return whiten_everywhere(adv, mask), returns


def kl_penalty(logprob: torch.FloatTensor, ref_logprob: torch.FloatTensor, kl_penalty) -> torch.FloatTensor:
    """verl's per-token KL: ``"kl"|"k1"`` x, ``"abs"`` |x|, ``"mse"|"k2"`` x^2/2, ``"low_var_kl"|"k3"``
    expm1(-x) + x clamped to [-10, 10], with x = logprob - ref_logprob; a ``"+"`` suffix keeps the value and
    takes the gradient of k2 (straight-through). ``"full"`` is NotImplementedError, as in verl."""
    name = kl_penalty
    if name in ("full", "full+"):
        raise NotImplementedError("kl_penalty='full' needs the full vocabulary distributions (not supported, as in verl)")
    check_choice("kl_penalty", name[:-1] if isinstance(name, str) and name.endswith("+") else name, _KL_NAMES)
    clamp = _K3_CLAMP if name.rstrip("+") in ("low_var_kl", "k3") else None
    return _kl_penalty(logprob, ref_logprob, name, clamp=clamp)


def agg_loss(loss_mat: torch.Tensor, loss_mask: torch.Tensor, loss_agg_mode: str, dp_size: int = 1,
             batch_num_tokens: Optional[int] = None, global_batch_size: Optional[int] = None,
             loss_scale_factor: Optional[int] = None):
    """verl's loss aggregation (``rlhf_fast.ops.agg`` modes, with verl's global-batch arguments); a 0-dim
    fp32 tensor, differentiable wrt ``loss_mat``."""
    check_choice("loss_agg_mode", loss_agg_mode, AGG_MODES)
    mask = check_mask("loss_mask", loss_mask, loss_mat.shape)
    scale = global_batch_scale(mask, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor)
    return aggregate(loss_mat.float(), mask, loss_agg_mode) * scale


def _policy_loss(old_log_prob, log_prob, advantages, response_mask, clip_low, clip_high, clip_ratio_c,
                 loss_agg_mode, rollout_is_weights=None, global_batch_info=None):
    """The fused policy loss with verl's conventions; returns ``(pg_loss, stats)`` of rlhf_fast.ops."""
    if not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c (dual-clip lower bound) must be > 1.0, got {clip_ratio_c!r}")
    check_choice("loss_agg_mode", loss_agg_mode, AGG_MODES)
    mask = check_mask("response_mask", response_mask, log_prob.shape)
    # verl multiplies the per-token loss by rollout_is_weights: the op's per-token weight
    weight = None if rollout_is_weights is None else rollout_is_weights.detach().float()
    loss, stats = ppo_policy_loss(log_prob, old_log_prob, advantages, mask, clip_low, clip_high, clip_ratio_c,
                                  loss_agg_mode, weight=weight)
    info = {k: v for k, v in (global_batch_info or {}).items() if k in GLOBAL_BATCH_KEYS}
    return loss * global_batch_scale(mask, loss_agg_mode, **info), stats


def compute_policy_loss(old_log_prob, log_prob, advantages, response_mask, cliprange=None, cliprange_low=None,
                        cliprange_high=None, clip_ratio_c=3.0, loss_agg_mode: str = "token-mean"):
    """verl's (deprecated) clipped PPO loss with dual clip: ``(pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower)``,
    0-dim fp32 tensors; pg_loss differentiable wrt ``log_prob``."""
    low = cliprange if cliprange_low is None else cliprange_low
    high = cliprange if cliprange_high is None else cliprange_high
    loss, stats = _policy_loss(old_log_prob, log_prob, advantages, response_mask, low, high, clip_ratio_c,
                               loss_agg_mode)
    return loss, stats["clipfrac"], stats["approx_kl"], stats["clipfrac_lower"]


def compute_policy_loss_vanilla(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                                response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config=None,
                                rollout_is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's registered "vanilla" policy loss: ``(pg_loss, {"actor/pg_clipfrac", "actor/ppo_kl",
    "actor/pg_clipfrac_lower"} -> float)``. ``config`` is verl's ActorConfig or anything with its fields
    (``clip_ratio``, ``clip_ratio_low``, ``clip_ratio_high``, ``clip_ratio_c``, ``global_batch_info``)."""
    if config is None:
        raise ValueError("config (verl ActorConfig: clip_ratio, clip_ratio_low/high, clip_ratio_c) is required")
    clip = config.clip_ratio
    low = clip if getattr(config, "clip_ratio_low", None) is None else config.clip_ratio_low
    high = clip if getattr(config, "clip_ratio_high", None) is None else config.clip_ratio_high
    clip_ratio_c = getattr(config, "clip_ratio_c", None)
    loss, stats = _policy_loss(old_log_prob, log_prob, advantages, response_mask, low, high,
                               3.0 if clip_ratio_c is None else clip_ratio_c, loss_agg_mode, rollout_is_weights,
                               getattr(config, "global_batch_info", None))
    metrics = {"actor/pg_clipfrac": stats["clipfrac"].item(), "actor/ppo_kl": stats["approx_kl"].item(),
               "actor/pg_clipfrac_lower": stats["clipfrac_lower"].item()}
    return loss, metrics


def compute_value_loss(vpreds: torch.Tensor, returns: torch.Tensor, values: torch.Tensor,
                       response_mask: torch.Tensor, cliprange_value: float, loss_agg_mode: str = "token-mean",
                       dp_size: int = 1, batch_num_tokens: Optional[int] = None,
                       global_batch_size: Optional[int] = None, loss_scale_factor: Optional[int] = None):
    """verl's clipped value loss: ``(vf_loss, vf_clipfrac)``, 0-dim fp32, vf_loss differentiable wrt ``vpreds``::

        vf_loss = 0.5 * agg_loss(max((vpreds - R)^2, (clamp(vpreds, values -+ cliprange_value) - R)^2))

    on the fused ``rlhf_fast.ops.ppo_value_loss`` (verl's global-batch arguments as in :func:`agg_loss`)."""
    check_choice("loss_agg_mode", loss_agg_mode, AGG_MODES)
    mask = check_mask("response_mask", response_mask, vpreds.shape)
    loss, stats = ppo_value_loss(vpreds, values, returns, mask, clip=cliprange_value, agg=loss_agg_mode)
    scale = global_batch_scale(mask, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor)
    return loss * scale, stats["vf_clipfrac"]
