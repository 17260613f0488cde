"""Drop-in replacements for the PPO functions of verl, OpenRLHF and TRL, running on :mod:`rlhf_fast.ops`.

Each function keeps the peer's name, signature and return structure, so switching is an import change::

    from verl.trainer.ppo import core_algos          ->  from rlhf_fast.compat import verl as core_algos
    from openrlhf.models.loss import PolicyLoss      ->  from rlhf_fast.compat.openrlhf import PolicyLoss
    from trl.trainer.utils import selective_log_softmax  ->  from rlhf_fast.compat.trl import selective_log_softmax

=========================================================  ============================================  =========================
peer function (version followed)                           ours                                          runs on
=========================================================  ============================================  =========================
verl 0.9.1 ``core_algos.compute_gae_advantage_return``     ``compat.verl.compute_gae_advantage_return``  ops.gae + ops.masked
verl ``core_algos.kl_penalty``                             ``compat.verl.kl_penalty``                    ops.kl_penalty
verl ``core_algos.agg_loss``                               ``compat.verl.agg_loss``                      ops.agg
verl ``core_algos.compute_policy_loss`` (deprecated)       ``compat.verl.compute_policy_loss``           ops.ppo_policy_loss
verl ``core_algos.compute_policy_loss_vanilla``            ``compat.verl.compute_policy_loss_vanilla``   ops.ppo_policy_loss
verl ``utils.torch_functional.masked_whiten``              ``compat.verl.masked_whiten``                 ops.masked
OpenRLHF 0.11.2 ``models.utils.compute_approx_kl``         ``compat.openrlhf.compute_approx_kl``         ops.kl_penalty
OpenRLHF ``models.utils.compute_reward``                   ``compat.openrlhf.compute_reward``            torch (already vectorised)
OpenRLHF ``RemoteExperienceMaker.get_advantages_and_returns``  ``compat.openrlhf.get_advantages_and_returns``  ops.gae
OpenRLHF ``models.loss.PolicyLoss`` ("ppo")                ``compat.openrlhf.PolicyLoss``                ops.ppo_policy_loss
OpenRLHF ``models.loss.ValueLoss``                         ``compat.openrlhf.ValueLoss``                 ops.ppo_value_loss
TRL 1.16 ``trainer.utils.selective_log_softmax``           ``compat.trl.selective_log_softmax``          ops.logprobs_from_logits
TRL ``trainer.utils.selective_log_softmax_and_entropy``    ``compat.trl.selective_log_softmax_and_entropy``  ops.logprobs_from_logits
TRL ``trainer.utils.entropy_from_logits``                  ``compat.trl.entropy_from_logits``            ops.logprobs_from_logits
TRL 1.10 ``experimental.ppo.ppo_trainer.masked_whiten``    ``compat.trl.masked_whiten``                  ops.masked
=========================================================  ============================================  =========================

Common differences (each module lists its own): outputs are fp32 whatever the input dtype (the peers keep
the input dtype); masks may be bool or {0,1}; degenerate batches (no valid token) give 0 instead of NaN,
and no function syncs the device to raise on them. ``tests/test_compat_*.py`` check every function against
the peer's own code on random masked inputs, values and gradients.
"""
from rlhf_fast.compat import openrlhf, trl, verl

__all__ = ["openrlhf", "trl", "verl"]
