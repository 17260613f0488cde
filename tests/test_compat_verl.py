"""rlhf_fast.compat.verl against verl 0.9.1's own core_algos (imported by tests/peers), values and gradients.

Tolerances: both sides compute in fp32 from the same fp32 values (bf16 inputs: the peer runs on their exact
fp32 upcast, since we accumulate in fp32), so only summation order differs: 1e-5 absolute/relative on O(1)
values. Policy-loss tests with rollout weights that are 0 allow 1e-6 more: a zero weight reaches the fused
op as exp(-20) (see compat/verl.py).
"""
import pytest
import torch
from omegaconf import OmegaConf

from _rl_inputs import awkward_mask
from peers import verl_module
from rlhf_fast.compat import verl as ours

B, T = 7, 11
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def verl():
    return verl_module()


def _mask():
    """verl's masks are {0,1} numbers (its GAE computes ``1 - mask``); every padding kind, one empty row."""
    return awkward_mask(B, T).float()


def _pair(x):
    """(ours, the peer's) leaf copies of ``x`` requiring grad; the peer's in fp32."""
    return x.clone().requires_grad_(), x.float().clone().requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_gae_matches_verl_everywhere(verl, dtype, gamma, lam):
    rewards, values, mask = torch.randn(B, T).to(dtype), torch.randn(B, T).to(dtype), _mask()
    adv, ret = ours.compute_gae_advantage_return(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = verl.compute_gae_advantage_return(rewards.float(), values.float(), mask, gamma, lam)
    assert adv.dtype == ret.dtype == torch.float32
    torch.testing.assert_close(adv, ref_adv, **TOL)          # masked positions included
    torch.testing.assert_close(ret, ref_ret, **TOL)


def test_gae_accepts_bool_mask_and_tensor_gamma(verl):
    rewards, values, mask = torch.randn(B, T), torch.randn(B, T), _mask()
    adv, ret = ours.compute_gae_advantage_return(rewards, values, mask.bool(), torch.tensor(0.99), torch.tensor(0.9))
    ref_adv, ref_ret = verl.compute_gae_advantage_return(rewards, values, mask, 0.99, 0.9)
    torch.testing.assert_close(adv, ref_adv, **TOL)
    torch.testing.assert_close(ret, ref_ret, **TOL)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_verl(shift_mean):
    verl_F = verl_module("utils.torch_functional")
    x, mask = torch.randn(B, T) * 3 + 1, _mask()
    torch.testing.assert_close(ours.masked_whiten(x, mask, shift_mean), verl_F.masked_whiten(x, mask, shift_mean),
                               **TOL)


KL_NAMES = ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k1+", "abs+", "k2+", "low_var_kl+", "k3+"]


@pytest.mark.parametrize("name", KL_NAMES)
def test_kl_penalty_values_and_grads(verl, name):
    # log-ratios up to +-30 reach verl's k3 clamps (inner [-20, 20], outer [-10, 10])
    logp = torch.randn(B, T) * 3
    logp[0, :4] = torch.tensor([-30.0, 30.0, -12.0, 12.0])
    ref_logp = torch.randn(B, T)
    (lp, lp_ref), (rp, rp_ref) = _pair(logp), _pair(ref_logp)
    out, ref = ours.kl_penalty(lp, rp, name), verl.kl_penalty(lp_ref, rp_ref, name)
    torch.testing.assert_close(out, ref, **TOL)
    g = torch.randn(B, T)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(lp.grad, lp_ref.grad, **TOL)
    torch.testing.assert_close(rp.grad, rp_ref.grad, **TOL)


def test_kl_penalty_bad_names():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="kl_penalty"):
        ours.kl_penalty(x, x, "k4")
    with pytest.raises(NotImplementedError):
        ours.kl_penalty(x, x, "full")


AGG = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
GLOBAL = [{}, {"dp_size": 4, "batch_num_tokens": 123, "global_batch_size": 29}, {"loss_scale_factor": 64}]


@pytest.mark.parametrize("mode", AGG)
@pytest.mark.parametrize("extra", GLOBAL, ids=["local", "global", "scale-factor"])
def test_agg_loss_values_and_grads(verl, mode, extra):
    loss_mat, mask = torch.randn(B, T), _mask()
    ours_in, ref_in = _pair(loss_mat)
    out = ours.agg_loss(ours_in, mask, mode, **extra)
    ref = verl.agg_loss(ref_in, mask, mode, **extra)
    torch.testing.assert_close(out, ref, **TOL)
    out.backward()
    ref.backward()
    torch.testing.assert_close(ours_in.grad, ref_in.grad, **TOL)


def test_agg_loss_bad_input():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        ours.agg_loss(x, torch.ones(3, 4), "mean")
    with pytest.raises(ValueError, match="loss_mask"):
        ours.agg_loss(x, torch.ones(3, 5), "token-mean")
    with pytest.raises(ValueError, match="batch_num_tokens"):
        ours.agg_loss(x, torch.ones(3, 4), "token-mean", dp_size=2)


@pytest.mark.parametrize("mode", AGG)
@pytest.mark.parametrize("extra", GLOBAL, ids=["local", "global", "scale-factor"])
def test_compute_value_loss_values_and_grads(verl, mode, extra):
    """Clipped and unclipped tokens both present (|vpreds - values| on both sides of the 0.2 clip range)."""
    values, returns, mask = torch.randn(B, T), torch.randn(B, T), _mask()
    ours_in, ref_in = _pair(values + torch.randn(B, T) * 0.3)
    loss, clipfrac = ours.compute_value_loss(ours_in, returns, values, mask, 0.2, mode, **extra)
    ref_loss, ref_clipfrac = verl.compute_value_loss(ref_in, returns, values, mask, 0.2, mode, **extra)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(clipfrac, ref_clipfrac, **TOL)
    assert 0 < ref_clipfrac < 1
    loss.backward()
    ref_loss.backward()
    torch.testing.assert_close(ours_in.grad, ref_in.grad, **TOL)


def _policy_inputs(dtype=torch.float32):
    old = -torch.rand(B, T) * 3
    logp = old + torch.randn(B, T) * 0.3          # ratios on both sides of the clip range
    adv = torch.randn(B, T)
    return logp.to(dtype), old.to(dtype), adv.to(dtype), _mask()


@pytest.mark.filterwarnings("ignore:.*deprecated:FutureWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("clips", [(0.2, None, None, 3.0), (None, 0.2, 0.28, 2.0)], ids=["sym", "asym"])
def test_compute_policy_loss_legacy(verl, dtype, mode, clips):
    logp, old, adv, mask = _policy_inputs(dtype)
    cliprange, low, high, c = clips
    mine, theirs = _pair(logp)
    out = ours.compute_policy_loss(old, mine, adv, mask, cliprange, low, high, c, mode)
    ref = verl.compute_policy_loss(old.float(), theirs, adv.float(), mask, cliprange, low, high, c, mode)
    assert len(out) == len(ref) == 4
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b.float(), **TOL)
    out[0].backward()
    ref[0].backward()
    # the gradient comes back in the input dtype: bf16 rounding (relative 2^-8) on that side
    grad_tol = TOL if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(mine.grad.float(), theirs.grad, **grad_tol)


@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("mode", AGG)
def test_compute_policy_loss_vanilla(verl, mode, weights):
    logp, old, adv, mask = _policy_inputs()
    config = OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_low": 0.15, "clip_ratio_high": 0.3, "clip_ratio_c": 3.0,
                               "global_batch_info": {"dp_size": 2, "batch_num_tokens": 90, "global_batch_size": 20}})
    w = None
    if weights:
        w = torch.rand(B, T) * 2
        w[1, :3] = 0.0                                    # rejected tokens
    mine, theirs = _pair(logp)
    loss, metrics = ours.compute_policy_loss_vanilla(old, mine, adv, mask, mode, config, w)
    ref_loss, ref_metrics = verl.compute_policy_loss_vanilla(old, theirs, adv, mask, mode, config, w)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=2e-6 if weights else 1e-6)
    assert metrics.keys() == ref_metrics.keys()
    assert all(isinstance(v, float) for v in metrics.values())
    for k in metrics:
        assert metrics[k] == pytest.approx(ref_metrics[k], abs=1e-6), k
    loss.backward()
    ref_loss.backward()
    torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-6)


def test_policy_loss_bad_input():
    logp, old, adv, mask = _policy_inputs()
    with pytest.raises(ValueError, match="clip_ratio_c"):
        ours.compute_policy_loss(old, logp, adv, mask, 0.2, clip_ratio_c=1.0)
    with pytest.raises(ValueError, match="response_mask"):
        ours.compute_policy_loss(old, logp, adv, mask[:, :-1], 0.2)
    with pytest.raises(TypeError, match="old_logp"):
        ours.compute_policy_loss(old.long(), logp, adv, mask, 0.2)


def test_peer_import_leaves_no_stub_behind():
    """tests/peers stubs ray only while importing verl: vllm and others must not find a fake ray later."""
    import sys

    from peers import _Stub
    verl_module()
    assert not isinstance(sys.modules.get("ray"), _Stub)
