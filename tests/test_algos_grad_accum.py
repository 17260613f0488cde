"""Gradient accumulation is exact: one minibatch cut into k micro-batches gives the update of one micro-batch,
for every scalar aggregation mode, with variable response lengths (policy + value + entropy terms)."""
import copy
import dataclasses
import functools
import random

import pytest
import torch

from _trainer_common import one_thread, sevens, strip_timings, tiny_policy, tokenizer  # noqa: F401
from rlhf_fast.data import SortTask
from rlhf_fast.ops.agg import SCALAR_AGG_MODES
from rlhf_fast.rollout import HFEngine
from rlhf_fast.rollout.base import Sample, collate
from rlhf_fast.trainer.config import PPOConfig
from rlhf_fast.trainer.ppo import PPOTrainer

PROMPTS = SortTask().prompts(16, seed=0)
SETUPS = {
    "gae": dict(estimator="gae", critic="separate", entropy_coef=0.05),
    "gae-head": dict(estimator="gae", critic="head", entropy_coef=0.05),
    "grpo": dict(estimator="grpo", entropy_coef=0.05),
}


@functools.cache
def _tokenizer():
    return tokenizer()


def _trainer(tok, **overrides):
    torch.manual_seed(0)
    policy = tiny_policy(tok)
    kw = dict(out_dir="unused", steps=1, batch_size=4, samples_per_prompt=4, max_new_tokens=6, lr=1e-2,
              critic_lr=1e-2, minibatch_size=8, ppo_epochs=1, kl_coef=0.01, init_value_from_reward=False,
              progress=False)
    kw.update(overrides)
    return PPOTrainer(PPOConfig(**kw), policy, tok, PROMPTS, HFEngine(policy, tok, max_model_len=24),
                      reward_fn=sevens)


def _batch(tok, rows=16, group=4):
    """A rollout batch with response lengths 1..6 (real token ids; the engine log-probs are not used here)."""
    rng = random.Random(0)
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:rows // group]]
    samples = []
    for b in range(rows):
        n = rng.randint(1, 6)
        samples.append(Sample(b // group, [rng.randrange(4, len(tok)) for _ in range(n)], [-1.0] * n, "length"))
    return collate(prompts, samples, tok.pad_token_id, 0)


@pytest.mark.parametrize("agg", SCALAR_AGG_MODES)
@pytest.mark.parametrize("setup", SETUPS)
def test_micro_batches_give_the_minibatch_update(setup, agg):
    tok = _tokenizer()
    base = _trainer(tok, loss_agg=agg, **SETUPS[setup])
    batch = _batch(tok)
    assert len(set(batch.response_mask.sum(1).tolist())) > 3       # variable lengths
    exp, _ = base.make_experience(batch, torch.randn(len(batch), generator=torch.Generator().manual_seed(1)))
    results = {}
    for k in (1, 2, 4):
        t = copy.deepcopy(base)
        t.config = dataclasses.replace(t.config, grad_accum=k)
        stats = t.update(exp, 0)
        models = [t.policy] + ([t.critic] if t.critic is not None and setup == "gae" else [])
        params = [p.detach().clone() for m in models for p in m.parameters()]
        grads = [p.grad.clone() for m in models for p in m.parameters() if p.grad is not None]
        results[k] = params, grads, stats
    p1, g1, s1 = results[1]
    for k in (2, 4):
        pk, gk, sk = results[k]
        for a, b in zip(g1, gk):     # the last minibatch's accumulated gradient, to fp32 rounding
            assert (b - a).abs().max() <= 1e-4 * a.abs().max() + 1e-9
        for a, b in zip(p1, pk):     # Adam's first steps turn the rounding of near-zero gradients into up to
            torch.testing.assert_close(b, a, rtol=0, atol=1e-4)   # ~1e-3 of a step (lr 1e-2): 1% of a step
        for key in ("policy_loss", "entropy", "value_loss", "policy_clipfrac", "value_vf_explained_var"):
            if key in s1:
                assert sk[key] == pytest.approx(s1[key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_whole_run_unchanged_by_grad_accum(tmp_path):
    tok = _tokenizer()
    runs = {}
    for k in (1, 4):
        t = _trainer(tok, out_dir=str(tmp_path / f"k{k}"), steps=3, batch_size=8, max_new_tokens=4,
                     minibatch_size=16, ppo_epochs=2, grad_accum=k, critic="head", entropy_coef=0.01)
        runs[k] = strip_timings(t.train()), [p.detach().clone() for p in t.policy.parameters()]
    (r1, p1), (r4, p4) = runs[1], runs[4]
    for a, b in zip(r1, r4):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    for a, b in zip(p1, p4):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
