"""The trainer's update is the same with the fused PPO objective (ops.linear_ppo_objective) and without it
(policy_logprobs + the policy loss + the entropy term): gradients, parameters and stats, for a critic (separate and
value head), critic-free GRPO in the single on-policy pass, several aggregation modes and micro-batching."""
import copy

import pytest
import torch

from _trainer_common import assert_same_update, one_thread, tokenizer  # noqa: F401
from test_algos_grad_accum import _batch, _trainer     # a tiny trainer; rollouts with response lengths 1..6

SETUPS = {
    "gae": dict(estimator="gae", critic="separate", entropy_coef=0.05, ppo_epochs=2, minibatch_size=8,
                grad_accum=2, loss_agg="seq-mean-token-mean", dual_clip=3.0),
    "gae-head": dict(estimator="gae", critic="head", entropy_coef=0.05, ppo_epochs=2, minibatch_size=8,
                     loss_agg="token-mean"),
    "grpo-single-pass": dict(estimator="grpo", kl_coef=0.0, entropy_coef=0.0, ppo_epochs=1, minibatch_size=16,
                             grad_accum=4, loss_agg="token-sum", max_mismatch=None),   # synthetic rollout logp
}


@pytest.mark.parametrize("setup", SETUPS)
def test_update_is_the_same_with_and_without_the_fused_objective(setup):
    tok = tokenizer()
    base = _trainer(tok, **SETUPS[setup])
    assert base.fused_objective                       # on by default where the objective allows it
    batch = _batch(tok)
    exp, _ = base.make_experience(batch, torch.randn(len(batch), generator=torch.Generator().manual_seed(1)))
    results = {}
    for fused in (True, False):
        t = copy.deepcopy(base)
        t.fused_objective = fused
        stats = t.update(exp, 0)
        results[fused] = [p.detach().clone() for p in t.policy.parameters()], \
            [p.grad.clone() for p in t.policy.parameters() if p.grad is not None], stats
    assert_same_update(results[True], results[False])


def test_objectives_it_cannot_fuse_fall_back():
    tok = tokenizer()
    t = _trainer(tok, estimator="grpo", policy_loss="gspo", ppo_epochs=1, minibatch_size=16)
    assert not t.uses_fused_objective()
    assert _trainer(tok, estimator="grpo").uses_fused_objective()
