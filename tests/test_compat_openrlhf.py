"""rlhf_fast.compat.openrlhf against OpenRLHF 0.11.2's own code (imported by tests/peers), values and gradients.

Tolerances: both sides compute in fp32 from the same fp32 values, so only summation order differs: 1e-5
absolute/relative on O(1) values. With the train/rollout correction on, a weight of 0 (a rejected token)
reaches the fused op as exp(-20) (see compat/openrlhf.py): 1e-6 more absolute slack on the loss.
"""
import pytest
import torch

from _rl_inputs import awkward_mask
from peers import openrlhf_module, source_function
from rlhf_fast.compat import openrlhf as ours

B, T = 7, 11
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def utils():
    return openrlhf_module("utils")


@pytest.fixture(scope="module")
def loss():
    return openrlhf_module("loss")


def _pair(x):
    return x.clone().requires_grad_(), x.clone().requires_grad_()


def _right_padded_mask():
    """OpenRLHF's layout: each row valid up to its EOS, padding after; one single-token row."""
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0] = 1
    return (torch.arange(T) < lengths[:, None]).float()


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("unbiased,with_old", [(False, False), (True, False), (True, True)])
def test_compute_approx_kl(utils, estimator, unbiased, with_old):
    logp = torch.randn(B, T) * 3
    logp[0, :4] = torch.tensor([-30.0, 30.0, -12.0, 12.0])       # reaches the [-10, 10] clamps
    base = torch.randn(B, T)
    old = (logp + 0.5 * torch.randn(B, T)) if with_old else None
    (lp, lp_ref), (bp, bp_ref) = _pair(logp), _pair(base)
    out = ours.compute_approx_kl(lp, bp, old, kl_estimator=estimator, unbiased_gradient=unbiased)
    ref = utils.compute_approx_kl(lp_ref, bp_ref, old, kl_estimator=estimator, unbiased_gradient=unbiased)
    torch.testing.assert_close(out, ref, **TOL)
    g = torch.randn(B, T)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(lp.grad, lp_ref.grad, **TOL)
    torch.testing.assert_close(bp.grad, bp_ref.grad, **TOL)


def test_compute_approx_kl_rejects_unknown_estimator():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="kl_estimator"):
        ours.compute_approx_kl(x, x, kl_estimator="abs")


@pytest.mark.parametrize("kl_coef,clip", [(0.05, None), (-1.0, None), (0.1, (-0.5, 2.0))])
def test_compute_reward(utils, kl_coef, clip):
    r, kl, mask = torch.randn(B) * 3, torch.randn(B, T), awkward_mask(B, T).float()   # left, gaps, empty rows too
    out = ours.compute_reward(r, kl_coef, kl, action_mask=mask, reward_clip_range=clip)
    ref = utils.compute_reward(r, kl_coef, kl, action_mask=mask, reward_clip_range=clip)
    torch.testing.assert_close(out, ref, **TOL)


def test_compute_reward_bad_input():
    with pytest.raises(ValueError, match="action_mask"):
        ours.compute_reward(torch.randn(B), 0.1, torch.randn(B, T))
    with pytest.raises(ValueError, match="action_mask"):
        ours.compute_reward(torch.randn(B), 0.1, torch.randn(B, T), action_mask=torch.ones(B, T + 1))


@pytest.mark.parametrize("masking", ["right", "awkward", "none"])
@pytest.mark.parametrize("gamma,lambd", [(1.0, 0.95), (0.9, 0.7)])
def test_get_advantages_and_returns(masking, gamma, lambd):
    peer = source_function("openrlhf", "trainer/ppo_utils/experience_maker.py",
                           "RemoteExperienceMaker.get_advantages_and_returns")
    values, rewards = torch.randn(B, T), torch.randn(B, T)
    mask = {"right": _right_padded_mask(), "awkward": awkward_mask(B, T).float(), "none": None}[masking]
    adv, ret = ours.get_advantages_and_returns(values, rewards, mask, gamma, lambd)
    ref_adv, ref_ret = peer(None, values, rewards, mask, gamma, lambd)
    torch.testing.assert_close(adv, ref_adv, **TOL)            # every position, padding included
    torch.testing.assert_close(ret, ref_ret, **TOL)


def _policy_inputs():
    old = -torch.rand(B, T) * 3
    logp = old + torch.randn(B, T) * 0.3
    rollout = old + torch.randn(B, T) * 0.4
    return logp, old, torch.randn(B, T), rollout, awkward_mask(B, T).float()


POLICY_CONFIGS = {
    "default": {},
    "dual-asym": {"clip_eps_low": 0.2, "clip_eps_high": 0.28, "dual_clip": 3.0},
    "seq-level": {"token_level_loss": False},
    "tis-token-clip": {"is_correction_level": "token", "is_correction_mode": "clip",
                       "is_correction_threshold": (0.8, 1.2)},
    "icepop-token-mask": {"is_correction_level": "token", "is_correction_threshold": (0.7, 1.4)},
    "seq-mask-ratio": {"is_correction_level": "seq", "is_correction_threshold": (0.8, 1.25)},
    "token-binary-kl": {"is_correction_level": "token", "is_correction_gating": "binary_kl",
                        "is_correction_threshold": (0.0, 0.05)},
    "seq-tv": {"is_correction_level": "seq", "is_correction_gating": "tv", "is_correction_threshold": (0.0, 0.05),
               "token_level_loss": False},
}


@pytest.mark.parametrize("config", list(POLICY_CONFIGS))
@pytest.mark.parametrize("global_batch", [False, True])
def test_policy_loss(loss, config, global_batch):
    kwargs = POLICY_CONFIGS[config]
    logp, old, adv, rollout, mask = _policy_inputs()
    extra = {"dp_size": 2, "batch_num_tokens": 80.0, "global_batch_size": 12.0} if global_batch else {}
    mine, theirs = _pair(logp)
    out = ours.PolicyLoss(**kwargs)(mine, old, adv, mask, rollout, **extra)
    ref = loss.PolicyLoss(**kwargs)(theirs, old, adv, mask, rollout, **extra)
    assert len(out) == len(ref) == 5
    slack = 1e-6 if "is_correction_level" in kwargs else 0.0
    for name, a, b in zip(("loss", "clip_ratio", "ppo_kl", "vllm_kl", "is_filter_ratio"), out, ref):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 + slack, msg=name)
    out[0].backward()
    ref[0].backward()
    torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-6)


def test_policy_loss_without_mask(loss):
    logp, old, adv, _, _ = _policy_inputs()
    out = ours.PolicyLoss()(logp, old, adv)
    ref = loss.PolicyLoss()(logp, old, adv)
    for a, b in zip(out[:3], ref[:3]):
        torch.testing.assert_close(a, b, **TOL)


def test_policy_loss_bad_config():
    with pytest.raises(NotImplementedError, match="gspo"):
        ours.PolicyLoss(policy_loss_type="gspo")
    with pytest.raises(ValueError, match="dual_clip"):
        ours.PolicyLoss(dual_clip=0.5)
    with pytest.raises(ValueError, match="is_correction_mode"):
        ours.PolicyLoss(is_correction_level="seq", is_correction_mode="clip")
    logp, old, adv, _, mask = _policy_inputs()
    with pytest.raises(ValueError, match="rollout_log_probs"):
        ours.PolicyLoss(is_correction_level="token")(logp, old, adv, mask)


@pytest.mark.parametrize("clip_eps", [None, 0.2])
@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("global_batch", [False, True])
def test_value_loss(loss, clip_eps, token_level_loss, global_batch):
    old = torch.randn(B, T)
    values, returns, mask = old + 0.4 * torch.randn(B, T), torch.randn(B, T), awkward_mask(B, T).float()
    extra = {"dp_size": 2, "batch_num_tokens": 80.0, "global_batch_size": 12.0} if global_batch else {}
    mine, theirs = _pair(values)
    out = ours.ValueLoss(clip_eps, token_level_loss)(mine, old, returns, mask, **extra)
    ref = loss.ValueLoss(clip_eps, token_level_loss)(theirs, old, returns, mask, **extra)
    torch.testing.assert_close(out, ref, **TOL)
    out.backward()
    ref.backward()
    torch.testing.assert_close(mine.grad, theirs.grad, **TOL)
