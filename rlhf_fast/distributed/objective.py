"""The PPO minibatch objective split over W data-parallel ranks, normalised by the global minibatch totals.

A minibatch of rows M is split into disjoint shards M_0..M_{W-1}, one per rank. Every aggregation mode of
:mod:`rlhf_fast.ops.agg` is ``sum_b s_b * rowsum_b``, with ``s_b`` a function of the row count ``n_b`` and of two
minibatch totals only::

    N = sum_{b in M} n_b        (all-reduced: sum over ranks of the shard's tokens)
    S = #{b in M : n_b > 0}     (all-reduced: non-empty rows)

    rank r:   L_r = sum_{b in M_r} s_b(N, S) * [ rowsum_b(pg) + vf_coef * rowsum_b(vf) ] - entropy_coef * sum_{b in M_r} rowsum_b(H) / N
    total:    L   = sum_r L_r            = the single-process minibatch loss, exactly (up to rounding)

Gradients: FSDP2 / DDP *average* the ranks' gradients, so each rank backpropagates ``W * L_r`` and the average is
``dL``. Entropy is a token mean whatever the mode (as in the single-process trainer).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from rlhf_fast import ops
from rlhf_fast.ops.agg import AGG_MODES


def global_totals(mask: torch.Tensor, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, S)`` over all ranks' shards of the minibatch (float64 0-dim); ``mask`` the local ``[b, T]`` bool."""
    counts = mask.sum(-1)
    totals = torch.stack([counts.sum(), (counts > 0).sum()]).to(torch.float64)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(totals, group=group)
    return totals[0], totals[1]


def row_scale_from_totals(counts: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor, width: int,
                          agg: str) -> torch.Tensor:
    """``s_b`` of :mod:`rlhf_fast.ops.agg` from the *global* totals ``N = tokens``, ``S = rows`` (fp32 ``[b]``)."""
    counts = counts.to(torch.float64)
    one = torch.ones_like(counts)
    N, S = tokens.clamp(min=1), rows.clamp(min=1)
    table = {"token-mean": one / N, "token-sum": one, "seq-mean-token-sum": one / S,
             "seq-mean-token-sum-norm": one / (S * width), "seq-mean-token-mean": 1.0 / (counts.clamp(min=1) * S)}
    if agg not in table:
        raise ValueError(f"agg must be one of {[m for m in AGG_MODES if m != 'none']} for training, got {agg!r}")
    return table[agg].float()


def shard_objective(cfg, logp, old_logp, advantages, mask, rollout_logp, entropy=None, values=None,
                    old_values=None, returns=None, group=None) -> tuple[torch.Tensor, dict]:
    """This rank's share ``L_r`` of the minibatch loss (module docstring) and its local stats.

    Inputs are the rank's rows ``[b, T]``; ``cfg`` a PPOConfig (clip, dual_clip, tis_cap, loss_agg, vf_coef,
    value_clip, entropy_coef). ``values``/``old_values``/``returns``: the critic's, or None without a critic.
    """
    tokens, rows = global_totals(mask, group)
    scale = row_scale_from_totals(mask.sum(-1), tokens, rows, mask.shape[-1], cfg.loss_agg)[:, None]
    pg, pstats = ops.ppo_policy_loss(
        logp, old_logp, advantages, mask, clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip,
        agg="none", rollout_logp=rollout_logp if cfg.tis_cap is not None else None, tis_cap=cfg.tis_cap)
    loss = (pg * scale).sum()
    stats = {"policy_loss": loss.detach(), **{f"policy_{k}": v for k, v in pstats.items()}}
    if entropy is not None:
        ent = torch.where(mask, entropy, 0.0).sum() / tokens.clamp(min=1).float()
        stats["entropy"] = ent.detach()
        if cfg.entropy_coef > 0:
            loss = loss - cfg.entropy_coef * ent
    if values is not None:
        vf, vstats = ops.ppo_value_loss(values, old_values, returns, mask, clip=cfg.value_clip, agg="none")
        vloss = (vf * scale).sum()
        loss = loss + cfg.vf_coef * vloss
        stats.update({"value_loss": vloss.detach(), **{f"value_{k}": v for k, v in vstats.items()}})
    return loss, stats
