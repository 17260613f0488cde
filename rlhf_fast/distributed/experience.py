"""Advantages from the gathered scoring outputs: identical on every rank, so no rank needs another's math.

Scoring is data-parallel (each rank runs the forwards on its rows); the per-token outputs are all-gathered
(``[B, R]`` each: small next to activations), then every rank computes, on the whole batch, exactly the
single-process :class:`rlhf_fast.trainer.ppo.PPOTrainer` math::

    rewards, kl = shape_rewards(score, old_logp, ref_logp, mask, beta)            (ops.shape_rewards)
    gae:          A, R = gae(rewards, V, mask, gamma, lam)
    reinforce++:  A = reinforce_pp_returns(rewards, mask, gamma)
    grpo / rloo:  A = grpo/rloo_advantages(sum_t rewards, samples_per_prompt) broadcast to tokens
    whiten A over all valid tokens (gae, reinforce++)                              (global statistics, not per shard)
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from rlhf_fast import ops


def shard_rows(n: int, world: int, rank: int) -> torch.Tensor:
    """Row indices of ``rank``'s shard of ``n`` rows (contiguous, sizes differ by at most one)."""
    return torch.tensor_split(torch.arange(n), world)[rank]


def all_gather_rows(local: torch.Tensor, n: int, group=None) -> torch.Tensor:
    """Concatenate every rank's ``[n_r, ...]`` shard (from :func:`shard_rows`) into ``[n, ...]`` on all ranks."""
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    if world == 1:
        return local
    sizes = [len(s) for s in torch.tensor_split(torch.arange(n), world)]
    padded = local.new_zeros((max(sizes), *local.shape[1:]))
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def advantages(cfg, scores: torch.Tensor, mask: torch.Tensor, old_logp: torch.Tensor,
               ref_logp: torch.Tensor | None, values: torch.Tensor | None, kl_coef: float) -> dict:
    """``{"advantages", "returns", "kl"}`` ``[B, R]`` (returns None without a critic) from whole-batch inputs."""
    rewards, kl = ops.shape_rewards(scores, old_logp, old_logp if ref_logp is None else ref_logp, mask, kl_coef,
                                    estimator=cfg.kl_estimator, reward_clip=cfg.reward_clip)
    returns = None
    if cfg.estimator == "gae":
        adv, returns = ops.gae(rewards, values, mask, cfg.gamma, cfg.lam)
    elif cfg.estimator == "reinforce++":
        adv = ops.reinforce_pp_returns(rewards, mask, cfg.gamma)
    else:
        seq = ops.masked_sum(rewards, mask, dim=1)
        adv = ops.expand_to_tokens(ops.grpo_advantages(seq, cfg.samples_per_prompt) if cfg.estimator == "grpo"
                                   else ops.rloo_advantages(seq, cfg.samples_per_prompt), mask)
    if cfg.whiten_advantages and cfg.estimator in ("gae", "reinforce++"):
        adv = ops.masked_whiten(adv, mask)
    return {"advantages": adv, "returns": returns, "kl": kl}
