"""rlhf_fast inside verl (checked against verl 0.9.1): ``rlhf_fast.integrations.verl.enable()`` in the driver
and the workers, before the trainer is built; then select the estimators and the loss by name in the config.

Through verl's own registries in ``verl.trainer.ppo.core_algos`` (its documented extension points):

=========================================  ================================  ====================================
config key = name                          verl's counterpart                runs on
=========================================  ================================  ====================================
``algorithm.adv_estimator=rlhf_fast_grpo``       ``grpo`` (``norm_adv_by_std_in_grpo``)  ``ops.grpo_advantages``
``algorithm.adv_estimator=rlhf_fast_rloo``       ``rloo``                          ``ops.rloo_advantages``
``algorithm.adv_estimator=rlhf_fast_reinforce_plus_plus``  ``reinforce_plus_plus``  ``ops.reinforce_pp_returns``
``actor.policy_loss.loss_mode=rlhf_fast_vanilla``  ``vanilla``                    ``compat.verl.compute_policy_loss_vanilla``
=========================================  ================================  ====================================

GAE: verl's ``compute_advantage`` calls ``core_algos.compute_gae_advantage_return`` by name for ``gae`` (its
registry route does not pass the values), so that name and the ``gae`` registry entry become
``compat.verl.compute_gae_advantage_return``: ``adv_estimator=gae`` runs the fused GAE.

KL and value loss have no registry in verl 0.9.1: ``core_algos.kl_penalty`` (the trainer's ``apply_kl_penalty``
and the actor's KL loss, every ``kl_penalty`` / ``kl_loss_type`` name) and ``core_algos.compute_value_loss``
(the critic's loss) become ``compat.verl``'s, also in the verl modules that imported them by name
(``verl.workers.utils.losses``). ``agg_loss`` stays verl's (a masked sum; nothing to fuse on its own).

The fused log-prob hook of verl's actor (``use_fused_kernels=True``, torch backend): verl's patched model forward
imports ``verl.utils.experimental.torch_functional.FusedLinearForPPO`` at call time; that name becomes
:class:`FusedLinearForPPO` (``rlhf_fast.ops.linear_logprobs`` with entropy). Grouped estimators take verl's
``index`` (uid per row): groups may be in any order but must all have the same size. ``call_counts()`` counts.
"""
from __future__ import annotations

import numpy as np
import torch

from rlhf_fast.compat import verl as compat
from rlhf_fast.compat._common import whiten_everywhere
from rlhf_fast.integrations._patch import Integration, Patch
from rlhf_fast.ops.advantages import expand_to_tokens, grpo_advantages, reinforce_pp_returns, rloo_advantages
from rlhf_fast.ops.linear_logprob import linear_logprobs

__all__ = ["enable", "disable", "enabled", "call_counts", "reset_counts", "FusedLinearForPPO", "SUPPORTED",
           "ADV_ESTIMATORS", "POLICY_LOSSES"]

SUPPORTED = ">=0.9.1,<0.10"


def _group_order(index, n: int) -> tuple[torch.Tensor, int]:
    """A stable permutation bringing equal ids of ``index`` (n rows) together, and the common group size."""
    if index is None or len(index) != n:
        raise ValueError(f"index must give a group id for each of the {n} rows, got {None if index is None else len(index)}")
    _, inverse, counts = np.unique(np.asarray(index), return_inverse=True, return_counts=True)
    if (counts != counts[0]).any():
        raise ValueError(f"index: every group must have the same number of rows, got sizes {sorted(set(counts.tolist()))}")
    return torch.from_numpy(np.argsort(inverse.reshape(-1), kind="stable")), int(counts[0])


def _grouped_advantage(estimator, token_level_rewards, response_mask, index, **kwargs):
    """Sequence scores -> ``estimator(scores in group order, G)`` -> back in row order, over the valid tokens."""
    scores = token_level_rewards.sum(-1)
    order, group_size = _group_order(index, scores.shape[0])
    adv = torch.empty_like(scores, dtype=torch.float32)
    adv[order.to(scores.device)] = estimator(scores[order.to(scores.device)], group_size, **kwargs)
    out = expand_to_tokens(adv, response_mask)
    return out, out


def compute_grpo_outcome_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index=None,
                                   epsilon: float = 1e-6, norm_adv_by_std_in_grpo: bool = True, config=None,
                                   **kwargs):
    """verl's GRPO: ``(A, A)`` with ``A = (s - mean_g) / (std_g + epsilon)`` (``s - mean_g`` without the std)
    over the valid tokens, ``s = token_level_rewards.sum(-1)``; ``config.norm_adv_by_std_in_grpo`` wins."""
    norm = getattr(config, "norm_adv_by_std_in_grpo", norm_adv_by_std_in_grpo)
    return _grouped_advantage(grpo_advantages, token_level_rewards, response_mask, index,
                              scale="group" if norm else "none", eps=epsilon)


def compute_rloo_outcome_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index=None,
                                   epsilon: float = 1e-6, config=None, **kwargs):
    """verl's RLOO: ``(A, A)``, ``A = s - mean of the other G-1 scores of the group`` over the valid tokens."""
    return _grouped_advantage(rloo_advantages, token_level_rewards, response_mask, index)


def compute_reinforce_plus_plus_outcome_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                                                  config=None, **kwargs):
    """verl's REINFORCE++: returns ``R_t = r_t + gamma R_next`` over the valid tokens (0 elsewhere), advantages
    the returns whitened over the valid tokens, times the mask. ``config.gamma`` is required, as in verl."""
    if config is None:
        raise ValueError("config (verl AlgoConfig with gamma) is required for reinforce_plus_plus")
    returns = reinforce_pp_returns(token_level_rewards, response_mask, float(config.gamma))
    mask = response_mask.bool()
    return whiten_everywhere(returns, mask) * mask, returns


class FusedLinearForPPO(torch.nn.Module):
    """verl's ``FusedLinearForPPO``: ``forward(hidden_states [..., H], vocab_weights [V, H], input_ids [...],
    temperature) -> (log_probs, entropy)`` fp32 ``[...]``, on ``rlhf_fast.ops.linear_logprobs``."""

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
        super().__init__()
        self.chunk_size, self.impl_backend = chunk_size, impl_backend

    def forward(self, hidden_states, vocab_weights, input_ids, temperature: float = 1.0):
        _INTEGRATION.count("FusedLinearForPPO")
        return linear_logprobs(hidden_states, vocab_weights, input_ids.long(), temperature=temperature,
                               return_entropy=True)


ADV_ESTIMATORS = {"rlhf_fast_grpo": compute_grpo_outcome_advantage, "rlhf_fast_rloo": compute_rloo_outcome_advantage,
                  "rlhf_fast_reinforce_plus_plus": compute_reinforce_plus_plus_outcome_advantage}
POLICY_LOSSES = {"rlhf_fast_vanilla": compat.compute_policy_loss_vanilla}


def _patches() -> list[Patch]:
    from verl.trainer.ppo import core_algos
    from verl.utils.experimental import torch_functional
    count = _INTEGRATION.counted
    gae = count("compute_gae_advantage_return", compat.compute_gae_advantage_return)
    return ([Patch(core_algos.ADV_ESTIMATOR_REGISTRY, name, count(name, fn), add=True)
             for name, fn in ADV_ESTIMATORS.items()]
            + [Patch(core_algos.POLICY_LOSS_REGISTRY, name, count(name, fn), add=True)
               for name, fn in POLICY_LOSSES.items()]
            + [Patch(core_algos, "compute_gae_advantage_return", gae),
               Patch(core_algos.ADV_ESTIMATOR_REGISTRY, "gae", gae),
               Patch(core_algos, "kl_penalty", count("kl_penalty", compat.kl_penalty)),
               Patch(core_algos, "compute_value_loss", count("compute_value_loss", compat.compute_value_loss)),
               Patch(torch_functional, "FusedLinearForPPO", FusedLinearForPPO)])


_INTEGRATION = Integration("verl", "verl", SUPPORTED, _patches)
enable, disable, enabled = _INTEGRATION.enable, _INTEGRATION.disable, _INTEGRATION.enabled
call_counts, reset_counts = _INTEGRATION.call_counts, _INTEGRATION.reset_counts
