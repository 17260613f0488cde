"""rlhf_fast inside OpenRLHF (checked against OpenRLHF 0.11.2): ``rlhf_fast.integrations.openrlhf.enable()`` in the
driver and in each Ray actor (e.g. at the top of the training script), before the actors build their models.

OpenRLHF has no registry for these pieces, so the names are replaced where its trainer looks them up at call
time: in the defining module and in every loaded ``openrlhf`` module that imported them by name (the actor
model, the PPO actor and critic, the experience maker, ``openrlhf.models``):

=============================================================  =========================================
OpenRLHF 0.11.2 name                                           becomes
=============================================================  =========================================
``models.utils.log_probs_from_logits`` (``Actor.forward``)      ``compat.trl.selective_log_softmax``
``models.utils.compute_entropy`` (``Actor.forward``)            ``compat.trl.entropy_from_logits``
``models.utils.compute_approx_kl`` (experience maker, actor)    ``compat.openrlhf.compute_approx_kl``
``models.utils.compute_reward`` (experience maker)              ``compat.openrlhf.compute_reward``
``models.loss.PolicyLoss`` (``PPOActor``)                       ``compat.openrlhf.PolicyLoss``
``models.loss.ValueLoss`` (``PPOCritic``)                       ``compat.openrlhf.ValueLoss``
``RemoteExperienceMaker.get_advantages_and_returns`` (GAE)      ``compat.openrlhf.get_advantages_and_returns``
=============================================================  =========================================

The experience maker's GAE method is patched when ``openrlhf.trainer.ppo_utils.experience_maker`` imports (it
needs Ray); otherwise that row is skipped, listed by ``skipped()``. ``log_probs_from_logits`` here does not
divide the caller's logits in place (OpenRLHF's does; its Actor divides them before the call and passes
temperature 1). ``PolicyLoss``: ``policy_loss_type="ppo"`` only (others raise, see compat.openrlhf).
"""
from __future__ import annotations

import importlib

from rlhf_fast.compat import openrlhf as compat
from rlhf_fast.compat import trl as compat_trl
from rlhf_fast.integrations._patch import Integration, Patch

__all__ = ["enable", "disable", "enabled", "call_counts", "reset_counts", "skipped", "SUPPORTED"]

SUPPORTED = ">=0.11.2,<0.12"
_EXPERIENCE_MAKER = "openrlhf.trainer.ppo_utils.experience_maker"
_skipped: list[str] = []


def gae_method(self, values, rewards, action_mask, gamma, lambd):
    """What ``RemoteExperienceMaker.get_advantages_and_returns`` becomes (``self`` unused)."""
    return compat.get_advantages_and_returns(values, rewards, action_mask, gamma, lambd)


def _patches() -> list[Patch]:
    utils = importlib.import_module("openrlhf.models.utils")
    loss = importlib.import_module("openrlhf.models.loss")
    count = _INTEGRATION.counted
    patches = [Patch(utils, "log_probs_from_logits", count("log_probs_from_logits", compat_trl.selective_log_softmax)),
               Patch(utils, "compute_entropy", count("compute_entropy", compat_trl.entropy_from_logits)),
               Patch(utils, "compute_approx_kl", count("compute_approx_kl", compat.compute_approx_kl)),
               Patch(utils, "compute_reward", count("compute_reward", compat.compute_reward)),
               Patch(loss, "PolicyLoss", _INTEGRATION.counted_module("PolicyLoss", compat.PolicyLoss)),
               Patch(loss, "ValueLoss", _INTEGRATION.counted_module("ValueLoss", compat.ValueLoss))]
    _skipped.clear()
    try:
        maker = importlib.import_module(_EXPERIENCE_MAKER).RemoteExperienceMaker
    except ImportError as e:
        _skipped.append(f"{_EXPERIENCE_MAKER}.RemoteExperienceMaker.get_advantages_and_returns ({e})")
    else:
        patches.append(Patch(maker, "get_advantages_and_returns", count("get_advantages_and_returns", gae_method)))
    return patches


def skipped() -> list[str]:
    """Targets the last ``enable()`` could not patch because their module does not import here."""
    return list(_skipped)


_INTEGRATION = Integration("openrlhf", "openrlhf", SUPPORTED, _patches)
enable, disable, enabled = _INTEGRATION.enable, _INTEGRATION.disable, _INTEGRATION.enabled
call_counts, reset_counts = _INTEGRATION.call_counts, _INTEGRATION.reset_counts
