"""The algorithm layer between :mod:`rlhf_fast.ops` and :mod:`rlhf_fast.trainer`: pieces that read like the formulas.

- :mod:`~rlhf_fast.algos.advantages`: ``ADVANTAGE_ESTIMATORS`` (gae, grpo, rloo, reinforce++), ``register_advantage``
- :mod:`~rlhf_fast.algos.policy_losses`: ``POLICY_LOSSES`` (vanilla clipped PPO with dual clip, gspo),
  ``register_policy_loss``
- :mod:`~rlhf_fast.algos.experience`: ``Experience`` (frozen) and the pure ``make_experience``
- :mod:`~rlhf_fast.algos.objective`: ``ppo_objective``, one micro-batch's loss normalised by its minibatch's totals
- :mod:`~rlhf_fast.algos.dynamic_sampling`: DAPO's dynamic sampling (drop groups of equal rewards, refill the batch)
"""
from rlhf_fast.algos.advantages import ADVANTAGE_ESTIMATORS, AdvantageParams, register_advantage
from rlhf_fast.algos.experience import Experience, make_experience
from rlhf_fast.algos.objective import Outputs, ppo_objective
from rlhf_fast.algos.policy_losses import POLICY_LOSSES, register_policy_loss

__all__ = ["ADVANTAGE_ESTIMATORS", "AdvantageParams", "register_advantage", "POLICY_LOSSES",
           "register_policy_loss", "Experience", "make_experience", "Outputs", "ppo_objective"]
