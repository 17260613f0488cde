"""masked_sum/mean/var/whiten: every backend against float64 statistics of the valid entries,
gradients against float64 autograd."""
import pytest
import torch

from rlhf_fast.ops import masked_mean, masked_sum, masked_var, masked_whiten

from _rl_inputs import awkward_mask, device_for

# fp32 accumulation of a few hundred O(1) values (two-pass, per-row partials merged in float64): ~1e-6
# relative; bf16 inputs are upcast exactly first, so they meet the same bound against a float64
# reference on the bf16 values. Gradients are returned in the input dtype: bf16 ones are within one bf16
# ulp (2^-7 relative at worst) of the rounded float64 gradient.
TOL = 1e-5
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7}


def stats64(x, m):
    v = x.double()[m.bool()]
    return v.mean(), v.var(unbiased=True), v.var(unbiased=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mean_var_whiten_match_float64(backend, dtype):
    B, T = 12, 23
    dev = device_for(backend)
    x = (torch.randn(B, T) * 3 + 1.5).to(dtype)
    m = awkward_mask(B, T)
    mean, var_u, var_b = stats64(x, m)
    xd, md = x.to(dev), m.to(dev)
    for got, want in [(masked_mean(xd, md, backend=backend), mean),
                      (masked_var(xd, md, backend=backend), var_u),
                      (masked_var(xd, md, unbiased=False, backend=backend), var_b)]:
        assert got.dtype == torch.float32 and got.dim() == 0
        torch.testing.assert_close(got.cpu().double(), want, atol=TOL, rtol=TOL)
    for shift_mean in (True, False):
        w = masked_whiten(xd, md, shift_mean=shift_mean, backend=backend)
        want = (x.double() - mean) / torch.sqrt(var_u + 1e-8) + (0 if shift_mean else mean)
        torch.testing.assert_close(w.cpu().double(), torch.where(m, want, 0.0), atol=TOL, rtol=TOL)


def _mean64(a, b):
    return a[b].mean()


def _var64(a, b):
    return a[b].var()


def _whiten64(a, b):
    return torch.where(b, (a - _mean64(a, b)) / torch.sqrt(_var64(a, b) + 1e-8), 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ours,ref64", [(masked_mean, _mean64), (masked_var, _var64), (masked_whiten, _whiten64)],
                         ids=["mean", "var", "whiten"])
def test_gradients_match_float64_autograd(backend, dtype, ours, ref64):
    B, T = 6, 11
    dev = device_for(backend)
    m = awkward_mask(B, T)
    x0 = torch.randn(B, T).to(dtype)
    g = torch.randn(B, T) if ours is masked_whiten else torch.tensor(1.7)
    x = x0.to(dev).detach().requires_grad_()
    ours(x, m.to(dev), backend=backend).backward(g.to(dev))
    x64 = x0.detach().double().requires_grad_()
    ref64(x64, m).backward(g.double())
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.cpu(), x64.grad.to(dtype), atol=TOL, rtol=GRAD_RTOL[dtype])
    assert (x.grad.cpu()[~m] == 0).all()


def test_degenerate_counts_give_zero_not_nan(backend):
    dev = device_for(backend)
    x = torch.randn(3, 4, device=dev)
    none = torch.zeros(3, 4, dtype=torch.bool, device=dev)
    one = none.clone()
    one[1, 2] = True
    assert masked_mean(x, none, backend=backend) == 0
    assert masked_var(x, none, backend=backend) == 0 and masked_var(x, one, backend=backend) == 0
    torch.testing.assert_close(masked_var(x, one, unbiased=False, backend=backend), torch.tensor(0.0, device=dev))
    assert (masked_whiten(x, none, backend=backend) == 0).all()
    w = masked_whiten(x, one, backend=backend)       # var 0 -> (x - mean) * rsqrt(eps) = 0 at the one token
    assert torch.isfinite(w).all() and (w == 0).all()


def test_odd_shapes_and_layouts(backend):
    """1-D, T=1, B=1, 3-D, a non-contiguous view and a {0,1} float mask."""
    dev = device_for(backend)
    cases = [torch.randn(37), torch.randn(9, 1), torch.randn(1, 40), torch.randn(3, 4, 5), torch.randn(20, 8).t()]
    for x in cases:
        m = torch.rand(x.shape) < 0.6
        m.view(-1)[0] = True
        mean, var_u, _ = stats64(x, m)
        xd, md = x.to(dev), m.to(dev).float()
        torch.testing.assert_close(masked_mean(xd, md, backend=backend).cpu().double(), mean, atol=TOL, rtol=TOL)
        torch.testing.assert_close(masked_var(xd, md, backend=backend).cpu().double(), var_u, atol=TOL, rtol=TOL)


def test_many_rows(backend):
    """More than 65,536 rows with tiny T, and large values (catastrophic cancellation if one-pass)."""
    dev = device_for(backend)
    x, m = torch.randn(70_000, 3) + 1e3, torch.rand(70_000, 3) < 0.8
    mean, var_u, _ = stats64(x, m)
    torch.testing.assert_close(masked_mean(x.to(dev), m.to(dev), backend=backend).cpu().double(), mean,
                               atol=0, rtol=1e-6)
    torch.testing.assert_close(masked_var(x.to(dev), m.to(dev), backend=backend).cpu().double(), var_u,
                               atol=0, rtol=1e-4)


def test_sum_and_mean_along_dim():
    x, m = torch.randn(5, 7), awkward_mask(5, 7)
    xd = torch.where(m, x.double(), 0.0)
    torch.testing.assert_close(masked_sum(x, m).double(), xd.sum(), atol=TOL, rtol=TOL)
    torch.testing.assert_close(masked_sum(x, m, dim=1).double(), xd.sum(1), atol=TOL, rtol=TOL)
    expected = xd.sum(1) / m.sum(1).clamp(min=1)
    torch.testing.assert_close(masked_mean(x, m, dim=1).double(), expected, atol=TOL, rtol=TOL)
    assert masked_mean(x, m, dim=1)[3] == 0          # the fully masked row


@pytest.mark.parametrize("fn", [masked_mean, masked_var, masked_whiten])
@pytest.mark.parametrize("kwargs,err,match", [
    ({"x": torch.ones(3, 4, dtype=torch.int64)}, TypeError, "x"),
    ({"mask": torch.ones(3, 5, dtype=torch.bool)}, ValueError, "mask"),
    ({"mask": torch.ones(3, 4, dtype=torch.complex64)}, TypeError, "mask"),
    ({"backend": "fast"}, ValueError, "backend"),
])
def test_bad_input(fn, kwargs, err, match):
    args = {"x": torch.randn(3, 4), "mask": torch.ones(3, 4, dtype=torch.bool), **kwargs}
    with pytest.raises(err, match=match):
        fn(**args)


def _mask_ops(dev="cpu"):
    """Every public op taking a mask, as ``f(mask, backend)`` on [3, 4] inputs on ``dev``."""
    from rlhf_fast.ops import gae, ppo_policy_loss, ppo_value_loss, shape_rewards
    x, scores = torch.randn(3, 4, device=dev), torch.randn(3, device=dev)
    return {
        "masked_mean": lambda m, b: masked_mean(x, m, backend=b),
        "masked_whiten": lambda m, b: masked_whiten(x, m, backend=b),
        "gae": lambda m, b: gae(x, x, m, backend=b)[0],
        "shape_rewards": lambda m, b: shape_rewards(scores, x, x * 0.5, m, 0.1, backend=b)[0],
        "ppo_policy_loss": lambda m, b: ppo_policy_loss(x, x * 0.9, x, m, backend=b)[0],
        "ppo_value_loss": lambda m, b: ppo_value_loss(x, x * 0.9, x, m, backend=b)[0],
    }


@pytest.mark.parametrize("op", list(_mask_ops()))
def test_masks_select_tokens_and_reject_other_values(backend, op):
    """bool and {0,1} numeric masks give the same result; any other value (a weight-like 0.5, 2, -1, NaN)
    is a ValueError naming the mask in every op, never read as 1 (the one check: _validation.check_mask)."""
    dev = device_for(backend)
    fn = _mask_ops(dev)[op]
    m = awkward_mask(3, 4).to(dev)
    want = fn(m, backend)
    for numeric in (m.float(), m.to(torch.bfloat16), m.to(torch.uint8), m.long()):
        torch.testing.assert_close(fn(numeric, backend), want)
    for bad in (0.5, 2.0, -1.0, float("nan")):
        weird = m.float()
        weird[0, 0] = bad
        with pytest.raises(ValueError, match="mask"):
            fn(weird, backend)
    with pytest.raises(ValueError, match="mask"):
        fn(m.long() * 2, backend)
