"""GRPO / RLOO / REINFORCE++ estimators against float64 loops written from the papers' definitions."""
import statistics

import pytest
import torch

from rlhf_fast.ops import expand_to_tokens, grpo_advantages, reinforce_pp_returns, rloo_advantages

from _rl_inputs import awkward_mask, device_for

TOL = 1e-5    # a handful of fp32 ops on O(1) scores: a few ulps


def _groups(scores, G):
    s = scores.double().tolist()
    return [s[i:i + G] for i in range(0, len(s), G)]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("G", [1, 2, 4])
def test_grpo(scale, G):
    scores = torch.randn(12) * 2
    batch_std = statistics.stdev(scores.double().tolist())
    want = []
    for g in _groups(scores, G):
        mean = statistics.fmean(g) if G > 1 else 0.0                     # verl: a lone sample keeps its score
        std = (statistics.stdev(g) if scale == "group" else batch_std if scale == "batch" else None) if G > 1 else None
        want += [(s - mean) / (std + 1e-6) if std is not None else s - mean for s in g]
    got = grpo_advantages(scores, G, scale=scale)
    assert got.dtype == torch.float32 and got.shape == (12,)
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), atol=TOL, rtol=TOL)


def test_grpo_bf16_scores_and_equal_group():
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 2.0, 1.0]).to(torch.bfloat16)
    got = grpo_advantages(scores, 3)
    assert got.dtype == torch.float32
    assert (got[:3] == 0).all()                  # identical scores: zero advantage, not NaN
    torch.testing.assert_close(got[3:], torch.tensor([-1.0, 1.0, 0.0]) / (1 + 1e-6))


@pytest.mark.parametrize("G", [2, 3])
def test_rloo(G):
    scores = torch.randn(9 if G == 3 else 8)
    want = [s - (sum(g) - s) / (G - 1) for g in _groups(scores, G) for s in g]
    torch.testing.assert_close(rloo_advantages(scores, G).double(), torch.tensor(want, dtype=torch.float64),
                               atol=TOL, rtol=TOL)


def test_reinforce_pp_returns(backend):
    B, T, gamma = 6, 15, 0.9
    dev = device_for(backend)
    rewards, mask = torch.randn(B, T), awkward_mask(B, T)
    want = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        running = 0.0
        for t in reversed(mask[b].nonzero().flatten().tolist()):   # masked gap tokens take no discount step
            running = float(rewards[b, t]) + gamma * running
            want[b, t] = running
    got = reinforce_pp_returns(rewards.to(dev), mask.to(dev), gamma, backend=backend)
    torch.testing.assert_close(got.cpu().double(), want, atol=TOL, rtol=TOL)


def test_expand_to_tokens():
    adv, mask = torch.randn(4), awkward_mask(4, 5)
    out = expand_to_tokens(adv.to(torch.bfloat16), mask.int())
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.where(mask, adv.to(torch.bfloat16).float()[:, None], 0.0))


@pytest.mark.parametrize("call,err,match", [
    (lambda: grpo_advantages(torch.randn(6), 4), ValueError, "group_size"),
    (lambda: grpo_advantages(torch.randn(6), 0), ValueError, "group_size"),
    (lambda: grpo_advantages(torch.randn(6), 2.0), ValueError, "group_size"),
    (lambda: grpo_advantages(torch.randn(6), 2, scale="std"), ValueError, "scale"),
    (lambda: grpo_advantages(torch.randn(6, 1), 2), ValueError, "scores"),
    (lambda: grpo_advantages(torch.arange(6), 2), TypeError, "scores"),
    (lambda: rloo_advantages(torch.randn(6), 1), ValueError, "group_size"),
    (lambda: reinforce_pp_returns(torch.randn(2, 3), torch.ones(2, 4)), ValueError, "mask"),
    (lambda: reinforce_pp_returns(torch.randn(2, 3), torch.ones(2, 3), gamma=1.1), ValueError, "gamma"),
    (lambda: reinforce_pp_returns(torch.ones(2, 3, dtype=torch.int32), torch.ones(2, 3)), TypeError, "rewards"),
    (lambda: expand_to_tokens(torch.randn(3), torch.ones(4, 2)), ValueError, "mask"),
])
def test_bad_input(call, err, match):
    with pytest.raises(err, match=match):
        call()
