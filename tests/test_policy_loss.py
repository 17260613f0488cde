"""ppo_policy_loss: every backend against the float64 reference (value, stats, and gradient vs autograd),
every agg mode, dual clip, truncated IS, awkward shapes, and parity with verl / OpenRLHF's own functions."""
import math

import pytest
import torch

import rlhf_fast.ops.policy_loss as pl
from rlhf_fast.ops import ppo_policy_loss
from rlhf_fast.ops.agg import AGG_MODES

from _rl_inputs import awkward_mask, device_for

# fp32: the kernels compute in fp32 what the reference computes in float64 from the same input values, so
# losses/stats carry fp32 rounding of sums over <= 500 O(1) terms (~1e-6 relative) -> 2e-5.
# bf16: inputs are rounded to bf16 BEFORE both computations (the reference sees the same values), so the loss
# and stats keep the fp32 tolerance; only the gradient is written in bf16 (8 mantissa bits, 2^-9 relative).
TOL = {torch.float32: dict(loss=2e-5, grad=2e-5), torch.bfloat16: dict(loss=2e-5, grad=8e-3)}
CONFIGS = {
    "plain": dict(),
    "asym+dual": dict(clip_high=0.28, dual_clip=3.0),
    "tis": dict(dual_clip=2.0, tis=True, tis_cap=1.3),
    "tis-uncapped": dict(tis=True),
}


def make_inputs(B, T, dtype=torch.float32, tis=False):
    """Log-ratios ~ N(0, 0.3^2) so a good share of tokens hits each clip; advantages of both signs."""
    logp = (-torch.rand(B, T) * 3).to(dtype)
    old = (logp.float() + 0.3 * torch.randn(B, T)).to(dtype)
    adv = (2 * torch.randn(B, T)).to(dtype)
    roll = (old.float() + 0.3 * torch.randn(B, T)).to(dtype) if tis else None
    return logp, old, adv, roll


def reference(logp, old, adv, mask, roll, upstream, **kw):
    """float64 loss, stats and autograd gradient of ``sum(upstream * loss)``."""
    x = logp.detach().double().clone().requires_grad_()
    loss, stats = pl.policy_loss_torch(x, old.double(), adv.double(), mask.bool(),
                                       rollout_logp=None if roll is None else roll.double(), dtype=torch.float64,
                                       **kw)
    (loss * upstream).sum().backward()
    return loss.detach(), stats, x.grad


def run(backend, logp, old, adv, mask, roll, upstream, **kw):
    dev = device_for(backend)
    x = logp.detach().clone().to(dev).requires_grad_()
    loss, stats = ppo_policy_loss(x, old.to(dev), adv.to(dev), mask.to(dev),
                                  rollout_logp=None if roll is None else roll.to(dev), backend=backend, **kw)
    (loss * upstream.to(dev, torch.float32)).sum().backward()
    return loss.detach().cpu(), {k: v.cpu() for k, v in stats.items()}, x.grad.cpu()


def check(backend, logp, old, adv, mask, roll=None, upstream=None, agg="token-mean", **kw):
    tol = TOL[logp.dtype]
    if upstream is None:  # a non-trivial upstream gradient: catches kernels that assume dL = 1
        upstream = torch.randn(mask.shape, dtype=torch.float64) if agg == "none" else torch.tensor(1.7, dtype=torch.float64)
    ref_loss, ref_stats, ref_grad = reference(logp, old, adv, mask, roll, upstream, agg=agg, **kw)
    loss, stats, grad = run(backend, logp, old, adv, mask, roll, upstream, agg=agg, **kw)
    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
    assert grad.dtype == logp.dtype and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=tol["loss"], atol=tol["loss"])
    scale = ref_grad.abs().max().clamp(min=1e-30)  # relative to the largest gradient entry
    torch.testing.assert_close(grad.double() / scale, ref_grad / scale, rtol=0, atol=tol["grad"])
    assert set(stats) == set(ref_stats)
    for k, v in stats.items():
        assert v.dtype == torch.float32 and v.dim() == 0 and not v.requires_grad, k
        torch.testing.assert_close(v.double(), ref_stats[k].double(), rtol=tol["loss"], atol=tol["loss"], msg=k)
    return loss, stats, grad


def kwargs_of(config):
    kw = dict(CONFIGS[config])
    return kw.pop("tis", False), kw


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_float64_reference(backend, agg, config):
    tis, kw = kwargs_of(config)
    B, T = 12, 37
    logp, old, adv, roll = make_inputs(B, T, tis=tis)
    check(backend, logp, old, adv, awkward_mask(B, T), roll, agg=agg, **kw)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "none"])
def test_bf16_inputs(backend, agg):
    B, T = 12, 37
    logp, old, adv, roll = make_inputs(B, T, torch.bfloat16, tis=True)
    check(backend, logp, old, adv, awkward_mask(B, T), roll, agg=agg, dual_clip=3.0, tis_cap=2.0)


def test_clips_are_exercised_and_block_the_gradient(backend):
    """The inputs really hit every branch, and clipped tokens (incl. |log-ratio| > 20) get zero gradient."""
    B, T = 4, 64
    logp, old, adv, roll = make_inputs(B, T, tis=True)
    logp[0, :4] = old[0, :4] + 25.0  # log-ratio beyond the +-20 clamp
    mask = torch.ones(B, T, dtype=torch.bool)
    _, stats, grad = check(backend, logp, old, adv, mask, roll, dual_clip=1.5, tis_cap=1.2)
    assert 0.05 < stats["clipfrac"] < 0.9 and stats["clipfrac_lower"] > 0 and stats["tis_clipfrac"] > 0
    assert (grad[0, :4] == 0).all() and stats["ratio_max"] == pytest.approx(math.exp(20.0), rel=1e-5)
    assert (grad == 0).float().mean() > 0.05 and (grad != 0).float().mean() > 0.3


def test_per_token_grad_uses_the_upstream_gradient(backend):
    """Regression for the peers' "wrong grads with reduction='none'": the fused backward must scale each token by
    its own upstream gradient, not assume a scalar loss (the check compares with autograd for a random upstream
    gradient, and a kernel ignoring it would give the ones-upstream gradient instead)."""
    B, T = 5, 23
    logp, old, adv, _ = make_inputs(B, T)
    mask = awkward_mask(B, T)
    upstream = torch.randn(B, T, dtype=torch.float64)
    tok, _, grad = check(backend, logp, old, adv, mask, upstream=upstream, agg="none")
    assert tok.shape == (B, T) and (tok[~mask] == 0).all()
    _, _, grad_ones = run(backend, logp, old, adv, mask, None, torch.ones(B, T), agg="none")
    assert not torch.allclose(grad, grad_ones)


@pytest.mark.parametrize("B,T", [(1, 1), (1, 9), (7, 1), (3, 2)])
def test_tiny_shapes(backend, B, T):
    logp, old, adv, roll = make_inputs(B, T, tis=True)
    for agg in ("token-mean", "seq-mean-token-mean"):
        check(backend, logp, old, adv, awkward_mask(B, T), roll, agg=agg, tis_cap=2.0)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_all_masked_gives_zero_not_nan(backend, agg):
    B, T = 3, 8
    logp, old, adv, _ = make_inputs(B, T)
    logp[0, 0] = float("nan")  # garbage at padded positions must not leak
    mask = torch.zeros(B, T, dtype=torch.bool)
    loss, stats, grad = run(backend, logp, old, adv, mask, None, torch.ones(()) if agg != "none" else torch.ones(B, T),
                            agg=agg)
    assert (loss == 0).all() and (grad == 0).all()
    assert all(v == 0 for v in stats.values()), stats


def test_left_right_padding_and_numeric_mask(backend):
    B, T = 4, 16
    logp, old, adv, _ = make_inputs(B, T)
    mask = torch.zeros(B, T, dtype=torch.int64)
    mask[0, :5] = 1   # right-padded
    mask[1, 9:] = 1   # left-padded
    mask[2, 3:12] = 1
    for agg in ("seq-mean-token-mean", "seq-mean-token-sum-norm"):
        check(backend, logp, old, adv, mask, agg=agg)


def test_non_contiguous_inputs(backend):
    B, T = 6, 20
    logp, old, _, roll = (x.t().contiguous().t() for x in make_inputs(B, T, tis=True))  # column-major views
    adv = (2 * torch.randn(B, 2 * T))[:, ::2]  # strided slice
    mask = awkward_mask(T, B).t()
    assert not logp.is_contiguous() and not adv.is_contiguous() and not mask.is_contiguous()
    check(backend, logp, old, adv, mask, roll, agg="seq-mean-token-sum", tis_cap=1.5)


def test_many_rows(backend):
    """More rows than the 65,536 grid limit of CUDA's y/z axes (a peer crash), small T."""
    B, T = 70_000, 3
    logp, old, adv, _ = make_inputs(B, T)
    check(backend, logp, old, adv, torch.rand(B, T) < 0.8, agg="seq-mean-token-mean", dual_clip=3.0)


@pytest.mark.parametrize("bad,kwargs,err", [
    ("agg", dict(agg="token-max"), ValueError),
    ("clip_low", dict(clip_low=-0.1), ValueError),
    ("clip_high", dict(clip_high=-1.0), ValueError),
    ("dual_clip", dict(dual_clip=1.0), ValueError),
    ("tis_cap", dict(tis_cap=2.0), ValueError),  # without rollout_logp
    ("old_logp", dict(old_logp=torch.zeros(4, 6)), ValueError),
    ("advantages", dict(advantages=torch.zeros(4, 5, dtype=torch.int64)), TypeError),
    ("logp", dict(logp=torch.zeros(4, 5, dtype=torch.int64)), TypeError),
    ("logp", dict(logp=torch.zeros(20)), ValueError),
    ("mask", dict(mask=torch.ones(4, 6, dtype=torch.bool)), ValueError),
    ("rollout_logp", dict(rollout_logp=torch.zeros(5, 5)), ValueError),
    ("backend", dict(backend="cuda"), ValueError),
])
def test_bad_input_raises_before_any_kernel(monkeypatch, bad, kwargs, err):
    def no_kernel(*_a, **_k):
        raise AssertionError("a kernel ran before validation")
    monkeypatch.setattr(pl, "_launch_forward", no_kernel)
    monkeypatch.setattr(pl, "policy_loss_torch", no_kernel)
    args = dict(logp=torch.zeros(4, 5), old_logp=torch.zeros(4, 5), advantages=torch.zeros(4, 5),
                mask=torch.ones(4, 5, dtype=torch.bool))
    args.update(kwargs)
    with pytest.raises(err, match=bad):
        ppo_policy_loss(**args)


# ------------------------------------------------------------------------------- parity with the peers' own code
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_matches_verl_compute_policy_loss_vanilla(agg):
    from peers import verl_module
    core = verl_module()
    from omegaconf import OmegaConf
    B, T = 8, 30
    logp, old, adv, roll = make_inputs(B, T, tis=True)
    mask = awkward_mask(B, T)
    mask[3] = False  # verl's seq modes exclude empty rows; so do we
    config = OmegaConf.create(dict(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0,
                                   global_batch_info={}))
    w = torch.clamp(torch.exp(old - roll), max=2.0)
    ref, metrics = core.compute_policy_loss_vanilla(old, logp, adv, mask.float(), agg, config, rollout_is_weights=w)
    loss, stats = ppo_policy_loss(logp, old, adv, mask, 0.2, 0.28, dual_clip=3.0, agg=agg, rollout_logp=roll,
                                  tis_cap=2.0)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(metrics["actor/pg_clipfrac"], abs=1e-6)
    assert stats["clipfrac_lower"].item() == pytest.approx(metrics["actor/pg_clipfrac_lower"], abs=1e-6)
    assert stats["approx_kl"].item() == pytest.approx(metrics["actor/ppo_kl"], abs=1e-6)


@pytest.mark.parametrize("token_level", [True, False])
def test_matches_openrlhf_policy_loss(token_level):
    from peers import openrlhf_module
    loss_mod = openrlhf_module("loss")
    B, T = 8, 30
    logp, old, adv, _ = make_inputs(B, T)
    mask = awkward_mask(B, T)
    ref, clip_ratio, ppo_kl, _, _ = loss_mod.PolicyLoss(0.2, 0.28, dual_clip=3.0, token_level_loss=token_level)(
        logp, old, adv, mask.float())
    loss, stats = ppo_policy_loss(logp, old, adv, mask, 0.2, 0.28, dual_clip=3.0,
                                  agg="token-mean" if token_level else "seq-mean-token-mean")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["clipfrac"], clip_ratio, rtol=0, atol=1e-6)
    torch.testing.assert_close(stats["approx_kl"], ppo_kl, rtol=1e-5, atol=1e-6)
