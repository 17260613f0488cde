"""The policy-loss layer: ppo_policy_loss's per-token ``weight`` on every backend against a float64 reference
(forward and backward), GSPO against the paper's sequence-level objective in float64, the registries."""
import pytest
import torch

import rlhf_fast.ops.policy_loss as pl
from rlhf_fast.algos import ADVANTAGE_ESTIMATORS, POLICY_LOSSES
from rlhf_fast.algos.policy_losses import gspo_policy_loss
from rlhf_fast.ops import ppo_policy_loss
from rlhf_fast.ops.agg import aggregate
from rlhf_fast.trainer.config import ConfigError, PPOConfig

from _rl_inputs import awkward_mask, device_for


def _inputs(B, T, tis=False):
    logp = -torch.rand(B, T) * 3
    old = logp + 0.3 * torch.randn(B, T)
    adv = 2 * torch.randn(B, T)
    roll = old + 0.3 * torch.randn(B, T) if tis else None
    weight = torch.rand(B, T) * 2
    weight[:, ::3] = 0.0                      # 0/1-style filtering of every third token
    return logp, old, adv, roll, weight


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "none"])
@pytest.mark.parametrize("tis", [False, True])
def test_weight_matches_float64_reference(backend, agg, tis):
    """loss = agg(weight * pg) with the mask's own normalisation; gradient = weight * the unweighted one."""
    B, T = 12, 37
    logp, old, adv, roll, weight = _inputs(B, T, tis)
    mask = awkward_mask(B, T)
    kw = dict(clip_high=0.28, dual_clip=3.0, tis_cap=1.3 if tis else None)
    upstream = torch.randn(B, T, dtype=torch.float64) if agg == "none" else torch.tensor(1.7, dtype=torch.float64)
    # reference: the unweighted per-token float64 losses, weighted and aggregated explicitly
    x = logp.double().requires_grad_()
    tok, _ = pl.policy_loss_torch(x, old.double(), adv.double(), mask, agg="none", dtype=torch.float64,
                                  rollout_logp=None if roll is None else roll.double(), **kw)
    ref = aggregate(tok * weight.double(), mask, agg)
    (ref * upstream).sum().backward()
    dev = device_for(backend)
    y = logp.clone().to(dev).requires_grad_()
    loss, _ = ppo_policy_loss(y, old.to(dev), adv.to(dev), mask.to(dev), agg=agg, weight=weight.to(dev),
                              rollout_logp=None if roll is None else roll.to(dev), backend=backend, **kw)
    (loss * upstream.to(dev, torch.float32)).sum().backward()
    torch.testing.assert_close(loss.detach().cpu().double(), ref.detach(), rtol=2e-5, atol=2e-5)
    scale = x.grad.abs().max()
    torch.testing.assert_close(y.grad.cpu().double() / scale, x.grad / scale, rtol=0, atol=2e-5)
    assert (y.grad.cpu()[:, ::3] == 0).all()  # weight 0: exactly no gradient (not e^-20)


def test_weight_is_checked():
    logp, old, adv, _, weight = _inputs(2, 5)
    with pytest.raises(ValueError, match="weight"):
        ppo_policy_loss(logp, old, adv, torch.ones(2, 5, dtype=torch.bool), weight=weight[:, :4])


def _gspo_sequence_reference(logp, old, adv_seq, mask, lo, hi):
    """The paper's objective in float64 with plain autograd: s_b = exp(mean_t(logp - old)) over the valid
    tokens, loss = -(1/S) sum_b min(s_b A_b, clip(s_b, 1 - lo, 1 + hi) A_b) over the non-empty rows."""
    x = logp.double().requires_grad_()
    m = mask.double()
    rows = mask.any(-1)
    s = torch.exp(((x - old.double()) * m).sum(-1) / m.sum(-1).clamp(min=1))
    a = adv_seq.double()
    j = torch.minimum(s * a, s.clamp(1 - lo, 1 + hi) * a)
    loss = -(j[rows]).mean()
    loss.backward()
    return loss.detach(), x.grad, s.detach()


def test_gspo_matches_the_sequence_level_objective():
    B, T = 12, 29
    mask = awkward_mask(B, T)
    logp = -torch.rand(B, T) * 3
    old = logp + 1e-3 * torch.randn(B, T) + 3e-4 * torch.randn(B, 1)   # sequence ratios within ~1e-3 of 1
    adv_seq = torch.randn(B)
    adv = torch.where(mask, adv_seq[:, None], 0.0)
    cfg = PPOConfig(policy_loss="gspo")
    ref_loss, ref_grad, s = _gspo_sequence_reference(logp, old, adv_seq, mask, cfg.gspo_clip_low,
                                                     cfg.gspo_clip_high)
    clipped = ((s < 1 - cfg.gspo_clip_low) | (s > 1 + cfg.gspo_clip_high))[mask.any(-1)]
    assert 0 < clipped.float().mean() < 1                               # both branches exercised
    x = logp.clone().requires_grad_()
    loss, stats = POLICY_LOSSES["gspo"](x, old, adv, mask, cfg, "seq-mean-token-mean")
    loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
    assert 0 < stats["clipfrac"] < 1 and stats["ratio_min"] < 1 < stats["ratio_max"]
    # every token of a row carries the row's ratio (not its own token ratio)
    assert torch.allclose(stats["ratio_mean"].double(), (s[:, None].expand(B, T)[mask]).mean(), atol=1e-6)


def test_gspo_weight_and_token_ratio_differ_from_vanilla():
    B, T = 4, 9
    logp, old, adv, _, weight = _inputs(B, T)
    mask = torch.ones(B, T, dtype=torch.bool)
    cfg = PPOConfig(policy_loss="gspo", gspo_clip_low=0.9, gspo_clip_high=10.0)
    plain, _ = gspo_policy_loss(logp, old, adv, mask, cfg, "token-mean")
    weighted, _ = gspo_policy_loss(logp, old, adv, mask, cfg, "token-mean", weight=weight)
    s = torch.exp((logp - old).mean(-1, keepdim=True))
    torch.testing.assert_close(plain, (-adv * s).mean())                       # unclipped: -mean(A s_b)
    torch.testing.assert_close(weighted, (-adv * s * weight).mean())


def test_registries_validate_the_config():
    assert set(ADVANTAGE_ESTIMATORS) >= {"gae", "grpo", "rloo", "reinforce++"}
    assert set(POLICY_LOSSES) >= {"vanilla", "gspo"}
    with pytest.raises(ConfigError, match=r"policy_loss.*vanilla.*gspo"):
        PPOConfig(policy_loss="ppo2")
    with pytest.raises(ConfigError, match=r"estimator.*gae"):
        PPOConfig(estimator="ppo")
    with pytest.raises(ConfigError, match="samples_per_prompt"):
        PPOConfig(estimator="rloo", samples_per_prompt=1)
    with pytest.raises(ConfigError, match="loss_agg"):
        PPOConfig(loss_agg="none")            # the trainer needs a scalar loss
