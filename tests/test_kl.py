"""kl_penalty and shape_rewards: every backend against float64 formulas written out here, gradients
against float64 autograd."""
import pytest
import torch

from rlhf_fast.ops import kl_penalty, shape_rewards

from _rl_inputs import awkward_mask, device_for

# Values and gradients are single elementwise fp32 evaluations (one exp at most), so fp32 inputs get
# a few fp32 ulps; bf16 inputs are upcast exactly and then computed in fp32, so the same bound holds
# for the fp32 values against a float64 reference on the bf16 inputs (a bf16-computing kernel would
# be off by ~1e-2). Gradients come back in the input dtype, so bf16 ones may differ from the rounded
# float64 gradient by one bf16 ulp (2^-7 relative at worst; the Triton interpreter's fp32->bf16 cast
# truncates where a GPU rounds to nearest).
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5}
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7}

VALUE = {   # x = logp - ref_logp
    "k1": lambda x: x,
    "k2": lambda x: 0.5 * x ** 2,
    "k3": lambda x: torch.expm1(-x) + x,
    "abs": lambda x: x.abs(),
}


def reference(logp, ref, estimator, clamp):
    """float64 value, and the function whose autograd gives the expected gradient."""
    base, straight = estimator.rstrip("+"), estimator.endswith("+")
    lp = logp.detach().double().requires_grad_()
    rp = ref.detach().double().requires_grad_()
    value = VALUE[base](lp - rp)
    if clamp is not None:
        value = value.clamp(-clamp, clamp)
    grad_source = 0.5 * (lp - rp) ** 2 if straight else value
    return value, grad_source, lp, rp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("clamp", [None, 0.3])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs", "k3+", "abs+"])
def test_kl_penalty_value_and_grads(backend, estimator, clamp, dtype):
    dev = device_for(backend)
    logp = (torch.randn(5, 13) * 0.7).to(dtype).to(dev).requires_grad_()
    ref = (torch.randn(5, 13) * 0.7).to(dtype).to(dev).requires_grad_()
    out = kl_penalty(logp, ref, estimator, clamp=clamp, backend=backend)
    assert out.dtype == torch.float32 and out.shape == logp.shape
    grad = torch.randn(5, 13, device=dev)
    out.backward(grad)
    value, grad_source, lp, rp = reference(logp.cpu(), ref.cpu(), estimator, clamp)
    grad_source.backward(grad.cpu().double())
    tol = TOL[dtype]
    torch.testing.assert_close(out.detach().cpu().double(), value.detach(), atol=tol, rtol=tol)
    assert logp.grad.dtype == dtype and ref.grad.dtype == dtype
    # the expected gradient, rounded to the input dtype as ours is
    torch.testing.assert_close(logp.grad.cpu(), lp.grad.to(dtype), atol=tol, rtol=GRAD_RTOL[dtype])
    torch.testing.assert_close(ref.grad.cpu(), rp.grad.to(dtype), atol=tol, rtol=GRAD_RTOL[dtype])


# k3 = expm1(-x) + x ~ x^2 / 2 near 0. Every backend computes in fp32 from the (exactly upcast) inputs, so for
# any input dtype the error is the rounding of expm1(-x) ~ -x (a few ulp of x) relative to x^2 / 2, i.e.
# ~ eps32 / |x|, plus a few ulp of the result. exp(-x) + x - 1 instead keeps an absolute error of ~eps32 (the
# rounding of exp(-x) ~ 1): a relative ~2 eps32 / x^2, 1e-3 at |x| = 1e-2, which this bound rejects.
EPS32 = torch.finfo(torch.float32).eps
K3_SMALL_X = torch.cat([torch.logspace(-4, 0, 41), -torch.logspace(-4, 0, 41)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_k3_small_log_ratio_against_float64(backend, dtype):
    dev = device_for(backend)
    x = K3_SMALL_X.to(dtype)
    logp = x.to(dev, copy=True).requires_grad_()
    out = kl_penalty(logp, torch.zeros_like(logp), "k3", backend=backend)
    out.backward(torch.ones_like(out))
    x64 = x.double()
    want = torch.expm1(-x64) + x64
    rel = ((out.detach().cpu().double() - want) / want).abs()
    bound = EPS32 * (8 / x64.abs() + 8)
    assert (rel <= bound).all(), f"worst at x={x64[(rel / bound).argmax()].item():.3g}: {rel.max().item():.3g}"
    # the fused backends' gradient -expm1(-x), returned in the input dtype: within one of its ulps. torch's autograd
    # of expm1 forms 1 - (expm1(-x) + 1): absolute error ~eps32, the reference's own limit.
    grad_want = -torch.expm1(-x64)
    grad_err = (logp.grad.cpu().double() - grad_want).abs()
    grad_bound = (8 * EPS32 + torch.finfo(dtype).eps) * grad_want.abs()   # one ulp: the interpreter truncates
    assert (grad_err <= (grad_bound + 2 * EPS32 if backend == "torch" else grad_bound)).all()


def test_k3_over_the_whole_float_range(backend):
    """exp(-x) overflows to inf below x = -88.7 and underflows above x = 87, as torch's fp32 exp does (the native
    kernel's vectorised exp handles both ends explicitly); clamp=10 turns the overflow into 10."""
    dev = device_for(backend)
    x = torch.tensor([-100.0, -90.0, -87.5, -50.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 50.0, 86.0, 90.0, 100.0])
    logp = x.clone().to(dev).requires_grad_()
    out = kl_penalty(logp, torch.zeros_like(logp), "k3", backend=backend)
    out.backward(torch.ones_like(out))
    expected = torch.exp(-x) + x - 1                      # fp32 torch: inf where exp overflows
    assert torch.isinf(expected[:2]).all()
    torch.testing.assert_close(out.detach().cpu(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logp.grad.cpu(), 1 - torch.exp(-x), atol=1e-5, rtol=1e-5)
    clamped = kl_penalty(x.to(dev), torch.zeros(13, device=dev), "k3", clamp=10.0, backend=backend)
    torch.testing.assert_close(clamped.cpu(), expected.clamp(max=10.0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("alias,base", [("kl", "k1"), ("mse", "k2"), ("low_var_kl", "k3"), ("low_var_kl+", "k3+")])
def test_verl_aliases(backend, alias, base):
    dev = device_for(backend)
    logp, ref = torch.randn(3, 7, device=dev), torch.randn(3, 7, device=dev)
    torch.testing.assert_close(kl_penalty(logp, ref, alias, backend=backend), kl_penalty(logp, ref, base, backend=backend))


def test_only_logp_requires_grad_and_odd_shapes(backend):
    """ref_logp without grad (the usual case), a 1-D and a non-contiguous 3-D input."""
    dev = device_for(backend)
    for shape in [(1,), (17,), (2, 3, 4)]:
        logp = torch.randn(*shape, device=dev).requires_grad_()
        ref = torch.randn(*reversed(shape), device=dev).permute(*reversed(range(len(shape))))
        out = kl_penalty(logp, ref, "k3", backend=backend)
        out.sum().backward()
        x = logp.detach().double() - ref.double()
        torch.testing.assert_close(out.double(), torch.exp(-x) + x - 1, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logp.grad.double(), 1 - torch.exp(-x), atol=1e-5, rtol=1e-5)


def test_large_flat_input(backend):
    """More than 65,536 rows of T=2: the elementwise grid is 1-D over blocks."""
    dev = device_for(backend)
    logp, ref = torch.randn(70_000, 2, device=dev), torch.randn(70_000, 2, device=dev)
    x = logp.double() - ref.double()
    torch.testing.assert_close(kl_penalty(logp, ref, "k2", backend=backend).double(), 0.5 * x * x,
                               atol=1e-5, rtol=1e-5)


def shape_rewards_naive(scores, logp, ref, mask, kl_coef, estimator, reward_clip, clamp):
    kl = VALUE[estimator](logp.double() - ref.double())
    if clamp is not None:
        kl = kl.clamp(-clamp, clamp)
    kl = torch.where(mask, kl, 0.0)
    rewards = -kl_coef * kl
    for b in range(mask.shape[0]):
        valid = mask[b].nonzero().flatten()
        if len(valid):
            s = float(scores[b])
            rewards[b, valid[-1]] += s if reward_clip is None else max(-reward_clip, min(reward_clip, s))
    return rewards, kl


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("estimator,reward_clip,clamp", [("k1", None, None), ("k3", 0.5, None), ("abs", None, 0.2)])
def test_shape_rewards(backend, estimator, reward_clip, clamp, dtype):
    B, T = 12, 19
    dev = device_for(backend)
    scores, logp, ref = torch.randn(B) * 2, torch.randn(B, T).to(dtype), torch.randn(B, T).to(dtype)
    mask = awkward_mask(B, T)
    rewards, kl = shape_rewards(scores.to(dev), logp.to(dev), ref.to(dev), mask.to(dev), 0.05, estimator,
                                reward_clip=reward_clip, clamp=clamp, backend=backend)
    assert rewards.dtype == kl.dtype == torch.float32
    ref_rewards, ref_kl = shape_rewards_naive(scores, logp, ref, mask, 0.05, estimator, reward_clip, clamp)
    torch.testing.assert_close(kl.cpu().double(), ref_kl, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(rewards.cpu().double(), ref_rewards, atol=TOL[dtype], rtol=TOL[dtype])
    assert rewards[3].abs().sum() == 0           # awkward_mask row 3 is fully masked


@pytest.mark.parametrize("B,T", [(1, 1), (70_000, 2)])
def test_shape_rewards_extreme_shapes(backend, B, T):
    dev = device_for(backend)
    scores, logp, ref = torch.randn(B), torch.randn(B, T), torch.randn(B, T)
    mask = torch.rand(B, T) < 0.7
    rewards, kl = shape_rewards(scores.to(dev), logp.to(dev), ref.to(dev), mask.to(dev), 0.1, "k2", backend=backend)
    ref_kl = torch.where(mask, 0.5 * (logp.double() - ref.double()) ** 2, 0.0)
    last = torch.where(mask, torch.arange(T), -1).amax(1)
    expected = -0.1 * ref_kl
    rows = (last >= 0).nonzero().flatten()
    expected[rows, last[rows]] += scores[rows].double()
    torch.testing.assert_close(kl.cpu().double(), ref_kl, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rewards.cpu().double(), expected, atol=1e-5, rtol=1e-5)


def test_shape_rewards_non_contiguous(backend):
    dev = device_for(backend)
    B, T = 6, 9
    logp = torch.randn(T, B, device=dev).t()
    ref = torch.randn(B, 2 * T, device=dev)[:, ::2]
    scores = torch.randn(2 * B, device=dev)[::2]
    mask = awkward_mask(B, T).to(dev).to(torch.float32)
    rewards, kl = shape_rewards(scores, logp, ref, mask, 0.2, backend=backend)
    exp_rewards, exp_kl = shape_rewards_naive(scores.cpu(), logp.cpu(), ref.cpu(), mask.bool().cpu(), 0.2, "k1",
                                              None, None)
    torch.testing.assert_close(rewards.cpu().double(), exp_rewards, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kl.cpu().double(), exp_kl, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs,err,match", [
    ({"estimator": "k4"}, ValueError, "estimator"),
    ({"estimator": "full"}, ValueError, "estimator"),
    ({"logp": torch.ones(3, 4, dtype=torch.int64)}, TypeError, "logp"),
    ({"ref_logp": torch.ones(3, 5)}, ValueError, "ref_logp"),
    ({"clamp": -1.0}, ValueError, "clamp"),
    ({"backend": "gpu"}, ValueError, "backend"),
])
def test_kl_penalty_bad_input(kwargs, err, match):
    args = {"logp": torch.randn(3, 4), "ref_logp": torch.randn(3, 4), **kwargs}
    with pytest.raises(err, match=match):
        kl_penalty(**args)


@pytest.mark.parametrize("kwargs,err,match", [
    ({"mask": torch.ones(3, 5, dtype=torch.bool)}, ValueError, "mask"),
    ({"scores": torch.ones(4)}, ValueError, "scores"),
    ({"scores": torch.ones(3, dtype=torch.int32)}, TypeError, "scores"),
    ({"logp": torch.ones(12)}, ValueError, "logp"),
    ({"ref_logp": torch.ones(3, 4, dtype=torch.int64)}, TypeError, "ref_logp"),
    ({"kl_coef": -0.1}, ValueError, "kl_coef"),
    ({"reward_clip": 0.0}, ValueError, "reward_clip"),
    ({"estimator": "k5+"}, ValueError, "estimator"),
])
def test_shape_rewards_bad_input_raises_before_any_kernel(backend, kwargs, err, match):
    dev = device_for(backend)
    args = {"scores": torch.randn(3), "logp": torch.randn(3, 4), "ref_logp": torch.randn(3, 4),
            "mask": torch.ones(3, 4, dtype=torch.bool), "kl_coef": 0.1, **kwargs}
    args = {k: a.to(dev) if isinstance(a, torch.Tensor) else a for k, a in args.items()}
    with pytest.raises(err, match=match):
        shape_rewards(**args, backend=backend)
