"""The policy and entropy terms of :func:`~rlhf_fast.algos.objective.ppo_objective` in one op fused with the lm_head.

::

    L_policy - entropy_coef * H = ops.linear_ppo_objective(h, W, y, old_logp, A, mask, agg=cfg.loss_agg,
                                                           loss_scale=ops.agg.totals_scale(mask, agg, totals))

with ``h`` the policy's last hidden states before each response token (``[b, R, H]``, the model's logit transforms
folded in by :func:`rlhf_fast.models.policy_logprobs.lm_head_inputs`) and ``y`` the response tokens. The same
formulas, normalisation and stats as the unfused terms, in 6 instead of 8 N H V FLOPs and without [tokens, vocab]
logits. :func:`fusable` says when the objective allows it (the vanilla clipped loss); otherwise the trainer falls
back to ``policy_logprobs`` + the registered policy loss.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from rlhf_fast.algos.experience import Experience
from rlhf_fast.models.policy_logprobs import decoder_hidden, lm_head_inputs
from rlhf_fast.ops.agg import totals_scale
from rlhf_fast.ops.linear_ppo import FUSED_AGG_MODES, linear_ppo_objective


class PolicyHead(NamedTuple):
    """What the fused objective reads instead of log-probs: response-aligned ``[b, R, H]`` states and ``[b, R]``
    labels, and the lm_head (``logits = softcap(hidden @ weight^T + bias)``)."""
    hidden: torch.Tensor
    labels: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None


def fusable(cfg) -> bool:
    """The objective has a fused form: the vanilla (token-ratio) clipped loss under a scalar aggregation."""
    return cfg.policy_loss == "vanilla" and cfg.loss_agg in FUSED_AGG_MODES


def policy_head(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int, pack: bool = False
                ) -> tuple[PolicyHead, torch.Tensor]:
    """``(head, hidden)``: the :class:`PolicyHead` of the response tokens ``input_ids[:, prompt_len:]`` (each
    scored from the state before it) and the decoder's whole ``[b, L, H]`` last hidden states (for a value head);
    ``pack``: the decoder runs padding-free where the model supports it."""
    hidden = decoder_hidden(model, input_ids, attention_mask, pack)
    h, weight, bias, softcap = lm_head_inputs(model, hidden[:, prompt_len - 1:-1])
    return PolicyHead(h, input_ids[:, prompt_len:], weight, bias, softcap), hidden


def fused_policy_terms(cfg, exp: Experience, head: PolicyHead, totals: tuple[int, int], entropy: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(L_policy - entropy_coef * H, logp [b, R], entropy [b, R] or None)`` of micro-batch ``exp``, normalised
    by its minibatch's ``totals``; logp/entropy detached, for the stats and the mismatch guard."""
    scale = totals_scale(exp.mask, cfg.loss_agg, totals)
    loss, _, logp, ent = linear_ppo_objective(
        head.hidden, head.weight, head.labels, exp.old_logp, exp.advantages, exp.mask, bias=head.bias,
        clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip, entropy_coef=cfg.entropy_coef,
        agg=cfg.loss_agg, loss_scale=scale, temperature=cfg.temperature, softcap=head.softcap,
        rollout_logp=exp.rollout_logp if cfg.tis_cap is not None else None, tis_cap=cfg.tis_cap,
        return_entropy=entropy, return_tokens=True)
    return loss, logp, ent
