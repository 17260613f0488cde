"""Length-grouped micro-batches (``group_by_length``): rows sorted by response length, each micro-batch cut to its
own longest prompt and response, give the update of the ungrouped, full-width micro-batches (every scalar
aggregation mode, critic / value head / GRPO, fused and unfused objective), and fewer tokens go through the model."""
import copy
import dataclasses

import pytest
import torch

from _trainer_common import assert_same_update, one_thread  # noqa: F401
from test_algos_grad_accum import SETUPS, _batch, _tokenizer, _trainer
from rlhf_fast.ops.agg import SCALAR_AGG_MODES

CASES = {**SETUPS, "grpo-single-pass": dict(estimator="grpo", kl_coef=0.0, entropy_coef=0.0, ppo_epochs=1,
                                            minibatch_size=16, max_mismatch=None)}


def _run(base, exp, grouped: bool, fused: bool, tokens: list | None = None):
    t = copy.deepcopy(base)
    t.config = dataclasses.replace(t.config, group_by_length=grouped)
    t.fused_objective = fused
    hook = None
    if tokens is not None:   # the [b, L] sequences the policy's decoder runs on
        hook = t.policy.model.register_forward_pre_hook(
            lambda m, args, kw: tokens.append((kw.get("input_ids", args[0] if args else None)).numel()),
            with_kwargs=True)
    stats = t.update(exp, 0)
    if hook is not None:
        hook.remove()
    models = [t.policy] + ([t.critic] if t.critic is not None and t.critic is not t.policy else [])
    params = [p for m in models for p in m.parameters()]
    return [p.detach().clone() for p in params], [p.grad.clone() for p in params if p.grad is not None], stats


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("agg", SCALAR_AGG_MODES)
@pytest.mark.parametrize("setup", CASES)
def test_grouped_update_is_the_ungrouped_one(setup, agg, fused):
    tok = _tokenizer()
    base = _trainer(tok, loss_agg=agg, grad_accum=4, **CASES[setup])
    assert base.config.group_by_length                      # on by default
    batch = _batch(tok)
    exp, _ = base.make_experience(batch, torch.randn(len(batch), generator=torch.Generator().manual_seed(1)))
    assert_same_update(_run(base, exp, True, fused), _run(base, exp, False, fused), atol=5e-4)

def test_grouping_cuts_the_padded_tokens():
    tok = _tokenizer()
    base = _trainer(tok, estimator="grpo", kl_coef=0.0, entropy_coef=0.0, minibatch_size=16, grad_accum=4,
                    max_mismatch=None)
    batch = _batch(tok)
    exp, _ = base.make_experience(batch, torch.zeros(len(batch)))
    counts = {}
    for grouped in (True, False):
        counts[grouped] = []
        _run(base, exp, grouped, True, counts[grouped])
    full = sum(counts[False])
    assert full == exp.input_ids.numel()                     # ungrouped: every micro-batch at the full width
    real = int(exp.attention_mask.sum())
    assert real <= sum(counts[True]) < full                  # grouped: fewer, never fewer than the real tokens
    print(f"tokens through the model: grouped {sum(counts[True])}, ungrouped {full}, real {real}")
