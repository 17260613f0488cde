"""The PPO objective of one micro-batch, normalised by the totals of its whole minibatch.

::

    L = L_policy + vf_coef * L_value - entropy_coef * H + ptx_coef * L_ptx

    L_policy = POLICY_LOSSES[policy_loss](logp, old_logp, A, mask)    old_logp = sg(logp) in the single on-policy pass
    L_value  = ops.ppo_value_loss(V, V_old, R, mask, clip=value_clip)                    (with a critic)
    H        = agg(entropy)                                                               (when the entropy is given)
    L_ptx    = -agg(log pi(ptx completion tokens))                                        (PPO-ptx, its own batch)

Every term is aggregated by the one mode ``cfg.loss_agg`` (:mod:`rlhf_fast.ops.agg`) and normalised by the totals
``(N, S)`` of the WHOLE minibatch (``ops.agg.batch_totals``, taken before its first micro-batch; the ptx term by
its own batch's totals) through ``ops.agg.global_batch_scale``. Summed over the micro-batches of a minibatch, the
losses and gradients are then the minibatch's exactly, whatever the split (``grad_accum``) and the response
lengths; the same holds across data-parallel ranks given the global totals.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from rlhf_fast import ops
from rlhf_fast.algos.experience import Experience
from rlhf_fast.algos.policy_losses import get_policy_loss
from rlhf_fast.ops.agg import aggregate, totals_scale


class Outputs(NamedTuple):
    """The learner's forward on a micro-batch: response-aligned ``[b, R]`` tensors, ptx ``[b', L']``."""
    logp: torch.Tensor
    entropy: torch.Tensor | None = None
    values: torch.Tensor | None = None
    ptx_logp: torch.Tensor | None = None

    def detach(self) -> "Outputs":
        return Outputs(*(None if t is None else t.detach() for t in self))

    def pad_to(self, width: int) -> "Outputs":
        """The response-aligned tensors right-padded with zeros to ``width`` columns (ptx unchanged)."""
        pad = lambda t: None if t is None else torch.nn.functional.pad(t, (0, width - t.shape[1]))
        return Outputs(pad(self.logp), pad(self.entropy), pad(self.values), self.ptx_logp)

    @staticmethod
    def cat(outs: list["Outputs"]) -> "Outputs":
        """Row-wise concatenation of micro-batch outputs (in micro-batch order)."""
        return Outputs(*(None if ts[0] is None else torch.cat(ts) for ts in zip(*outs)))


def _policy_terms(cfg, exp: Experience, out: Outputs, scale) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``L_policy - entropy_coef * H`` (scaled to the minibatch's totals) and their stats."""
    agg, mask = cfg.loss_agg, exp.mask
    old_logp = out.logp.detach() if exp.old_logp is None else exp.old_logp
    policy, pstats = get_policy_loss(cfg.policy_loss)(
        out.logp, old_logp, exp.advantages, mask, cfg, agg,
        rollout_logp=exp.rollout_logp if cfg.tis_cap is not None else None)
    loss = policy * scale
    stats = {"policy_loss": loss.detach(), **{f"policy_{k}": v for k, v in pstats.items()}}
    if out.entropy is not None:
        entropy = aggregate(out.entropy, mask, agg) * scale
        stats["entropy"] = entropy.detach()
        if cfg.entropy_coef > 0:
            loss = loss - cfg.entropy_coef * entropy
    return loss, stats


def ppo_objective(cfg, exp: Experience, out: Outputs, totals: tuple[int, int], ptx_mask: torch.Tensor | None = None,
                  ptx_totals: tuple[int, int] | None = None, policy_term: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss, stats)`` of micro-batch ``exp`` (its rows of the experience) with the model outputs ``out``.

    cfg: PPOConfig (or anything with its fields: loss_agg, policy_loss, clip_*, dual_clip, gspo_clip_*, tis_cap,
    vf_coef, value_clip, entropy_coef, ptx_coef). totals: ``(N, S)`` of the minibatch; ptx_mask/ptx_totals: the
    ptx micro-batch's response mask and its batch's totals. Stats are detached 0-dim tensors; the loss terms in
    them are this micro-batch's share (they add up over the minibatch). policy_term: ``L_policy - entropy_coef * H``
    already computed (and differentiable) by :func:`rlhf_fast.algos.fused_objective.fused_policy_terms`; the
    policy and entropy stats are then left to a pass without it (the trainer's whole-minibatch stats).
    """
    agg, mask = cfg.loss_agg, exp.mask
    scale = totals_scale(mask, agg, totals)
    loss, stats = (policy_term, {}) if policy_term is not None else _policy_terms(cfg, exp, out, scale)
    if out.values is not None:
        value, vstats = ops.ppo_value_loss(out.values, exp.values, exp.returns, mask, clip=cfg.value_clip, agg=agg)
        value = value * scale
        loss = loss + cfg.vf_coef * value
        stats.update({"value_loss": value.detach(), **{f"value_{k}": v for k, v in vstats.items()}})
    if out.ptx_logp is not None:
        ptx = -aggregate(out.ptx_logp, ptx_mask, agg) * totals_scale(ptx_mask, agg, ptx_totals)
        stats["ptx_loss"] = ptx.detach()
        loss = loss + cfg.ptx_coef * ptx
    return loss, stats
