"""ppo_value_loss: every backend against the float64 reference (value, stats, and gradient vs autograd),
every agg mode, clip on/off, awkward shapes, and parity with verl / OpenRLHF's own functions."""
import pytest
import torch

import rlhf_fast.ops.value_loss as vl
from rlhf_fast.ops import ppo_value_loss
from rlhf_fast.ops.agg import AGG_MODES

from _rl_inputs import awkward_mask, device_for

# fp32: fp32 rounding of sums over <= 500 O(1) terms (~1e-6 relative) -> 2e-5; the explained variance
# subtracts E[x]^2 from E[x^2] (|mean| ~ 1, var ~ 1 here), which costs about one more digit -> 2e-4 for it.
# bf16: inputs are rounded to bf16 before both computations, so loss and stats keep the fp32 tolerance;
# the gradient is written in bf16 (8 mantissa bits, 2^-9 relative).
TOL = {torch.float32: dict(loss=2e-5, grad=2e-5), torch.bfloat16: dict(loss=2e-5, grad=8e-3)}
STAT_TOL = {"vf_explained_var": 2e-4}


def make_inputs(B, T, dtype=torch.float32):
    """Values within +-0.4 of the old values, so that clip=0.2 clips a good share of tokens."""
    old = torch.randn(B, T)
    values = old + 0.4 * torch.randn(B, T)
    returns = 1.0 + old + 0.5 * torch.randn(B, T)
    return values.to(dtype), old.to(dtype), returns.to(dtype)


def reference(values, old, returns, mask, upstream, **kw):
    x = values.detach().double().clone().requires_grad_()
    loss, stats = vl.value_loss_torch(x, old.double(), returns.double(), mask.bool(), dtype=torch.float64, **kw)
    (loss * upstream).sum().backward()
    return loss.detach(), stats, x.grad


def run(backend, values, old, returns, mask, upstream, **kw):
    dev = device_for(backend)
    x = values.detach().clone().to(dev).requires_grad_()
    loss, stats = ppo_value_loss(x, old.to(dev), returns.to(dev), mask.to(dev), backend=backend, **kw)
    (loss * upstream.to(dev, torch.float32)).sum().backward()
    return loss.detach().cpu(), {k: v.cpu() for k, v in stats.items()}, x.grad.cpu()


def check(backend, values, old, returns, mask, upstream=None, agg="token-mean", **kw):
    tol = TOL[values.dtype]
    if upstream is None:  # a non-trivial upstream gradient: catches kernels that assume dL = 1
        upstream = torch.randn(mask.shape, dtype=torch.float64) if agg == "none" else torch.tensor(1.7, dtype=torch.float64)
    ref_loss, ref_stats, ref_grad = reference(values, old, returns, mask, upstream, agg=agg, **kw)
    loss, stats, grad = run(backend, values, old, returns, mask, upstream, agg=agg, **kw)
    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
    assert grad.dtype == values.dtype and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=tol["loss"], atol=tol["loss"])
    scale = ref_grad.abs().max().clamp(min=1e-30)
    torch.testing.assert_close(grad.double() / scale, ref_grad / scale, rtol=0, atol=tol["grad"])
    assert set(stats) == set(ref_stats)
    for k, v in stats.items():
        assert v.dtype == torch.float32 and v.dim() == 0 and not v.requires_grad, k
        t = STAT_TOL.get(k, tol["loss"])
        torch.testing.assert_close(v.double(), ref_stats[k].double(), rtol=t, atol=t, msg=k)
    return loss, stats, grad


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("clip", [0.2, None])
def test_matches_float64_reference(backend, agg, clip):
    B, T = 12, 37
    check(backend, *make_inputs(B, T), awkward_mask(B, T), agg=agg, clip=clip)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "none"])
def test_bf16_inputs(backend, agg):
    B, T = 12, 37
    check(backend, *make_inputs(B, T, torch.bfloat16), awkward_mask(B, T), agg=agg)


def test_clip_is_exercised_and_blocks_the_gradient(backend):
    B, T = 4, 64
    _, stats, grad = check(backend, *make_inputs(B, T), torch.ones(B, T, dtype=torch.bool), clip=0.1)
    assert 0.1 < stats["vf_clipfrac"] < 0.9
    assert 0.1 < (grad == 0).float().mean() < 0.9


def test_per_token_grad_uses_the_upstream_gradient(backend):
    """Regression for the peers' "wrong grads with reduction='none'" (see test_policy_loss)."""
    B, T = 5, 23
    values, old, returns = make_inputs(B, T)
    mask = awkward_mask(B, T)
    tok, _, grad = check(backend, values, old, returns, mask, upstream=torch.randn(B, T, dtype=torch.float64),
                         agg="none")
    assert tok.shape == (B, T) and (tok[~mask] == 0).all()
    _, _, grad_ones = run(backend, values, old, returns, mask, torch.ones(B, T), agg="none")
    assert not torch.allclose(grad, grad_ones)


@pytest.mark.parametrize("B,T", [(1, 1), (1, 9), (7, 1), (3, 2)])
def test_tiny_shapes(backend, B, T):
    for agg in ("token-mean", "seq-mean-token-mean"):
        check(backend, *make_inputs(B, T), awkward_mask(B, T), agg=agg)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_all_masked_gives_zero_not_nan(backend, agg):
    B, T = 3, 8
    values, old, returns = make_inputs(B, T)
    values[0, 0] = float("nan")  # garbage at padded positions must not leak
    upstream = torch.ones(B, T) if agg == "none" else torch.ones(())
    loss, stats, grad = run(backend, values, old, returns, torch.zeros(B, T, dtype=torch.bool), upstream, agg=agg)
    assert (loss == 0).all() and (grad == 0).all()
    assert all(v == 0 for v in stats.values()), stats


def test_left_right_padding_numeric_mask_non_contiguous(backend):
    B, T = 4, 16
    values, old, returns = (x.t().contiguous().t() for x in make_inputs(B, T))  # column-major views
    mask = torch.zeros(B, T, dtype=torch.float32)
    mask[0, :5] = 1   # right-padded
    mask[1, 9:] = 1   # left-padded
    mask[2, 3:12] = 1
    assert not values.is_contiguous()
    for agg in ("seq-mean-token-mean", "seq-mean-token-sum-norm"):
        check(backend, values, old, returns, mask, agg=agg)


def test_many_rows(backend):
    """More rows than the 65,536 grid limit of CUDA's y/z axes (a peer crash), small T."""
    B, T = 70_000, 3
    check(backend, *make_inputs(B, T), torch.rand(B, T) < 0.8, agg="seq-mean-token-mean")


@pytest.mark.parametrize("bad,kwargs,err", [
    ("agg", dict(agg="mean"), ValueError),
    ("clip", dict(clip=-0.2), ValueError),
    ("clip", dict(clip=0.0), ValueError),
    ("old_values", dict(old_values=torch.zeros(4, 6)), ValueError),
    ("returns", dict(returns=torch.zeros(4, 5, dtype=torch.int32)), TypeError),
    ("values", dict(values=torch.zeros(4, 5, dtype=torch.int64)), TypeError),
    ("values", dict(values=torch.zeros(4, 5, 1)), ValueError),
    ("mask", dict(mask=torch.ones(5, 5)), ValueError),
    ("backend", dict(backend="gpu"), ValueError),
])
def test_bad_input_raises_before_any_kernel(monkeypatch, bad, kwargs, err):
    def no_kernel(*_a, **_k):
        raise AssertionError("a kernel ran before validation")
    monkeypatch.setattr(vl._FusedValueLoss, "apply", no_kernel)
    monkeypatch.setattr(vl, "value_loss_torch", no_kernel)
    args = dict(values=torch.zeros(4, 5), old_values=torch.zeros(4, 5), returns=torch.zeros(4, 5),
                mask=torch.ones(4, 5, dtype=torch.bool))
    args.update(kwargs)
    with pytest.raises(err, match=bad):
        ppo_value_loss(**args)


# ------------------------------------------------------------------------------- parity with the peers' own code
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_matches_verl_compute_value_loss(agg):
    from peers import verl_module
    core = verl_module()
    B, T = 8, 30
    values, old, returns = make_inputs(B, T)
    mask = awkward_mask(B, T)
    ref, ref_clipfrac = core.compute_value_loss(values, returns, old, mask.float(), 0.2, agg)
    loss, stats = ppo_value_loss(values, old, returns, mask, 0.2, agg)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["vf_clipfrac"], ref_clipfrac, rtol=0, atol=1e-6)


@pytest.mark.parametrize("token_level,clip", [(True, 0.2), (False, 0.2), (True, None)])
def test_matches_openrlhf_value_loss(token_level, clip):
    from peers import openrlhf_module
    loss_mod = openrlhf_module("loss")
    B, T = 8, 30
    values, old, returns = make_inputs(B, T)
    mask = awkward_mask(B, T)
    ref = loss_mod.ValueLoss(clip, token_level_loss=token_level)(values, old, returns, mask.float())
    loss, _ = ppo_value_loss(values, old, returns, mask, clip, "token-mean" if token_level else "seq-mean-token-mean")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
