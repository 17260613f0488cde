"""rlhf_fast.integrations.openrlhf inside OpenRLHF 0.11.2 (imported by tests/peers): the names its trainer looks
up at call time give OpenRLHF's values and gradients with the integration on, counted; disable restores them."""
import sys

import pytest
import torch

from _rl_inputs import awkward_mask
from peers import openrlhf_module, source_function
from rlhf_fast.integrations import _patch
from rlhf_fast.integrations import openrlhf as fast

B, T, V = 6, 10, 40
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def utils():
    return openrlhf_module("utils")


@pytest.fixture(scope="module")
def loss():
    return openrlhf_module("loss")


@pytest.fixture(autouse=True)
def _off(utils, loss):
    fast.disable()
    fast.reset_counts()
    yield
    fast.disable()


def _both(fn_of_module, *leaves):
    """``fn_of_module()`` run without and with the integration on fresh leaf copies of ``leaves``:
    [(outputs, grads of the leaves)] for off and on; the first output is differentiated."""
    out = []
    for on in (False, True):
        xs = [x.clone().requires_grad_() for x in leaves]
        with fast.enabled() if on else torch.enable_grad():
            res = fn_of_module(*xs)
        res = res if isinstance(res, tuple) else (res,)
        res[0].sum().backward()
        out.append(([r.detach() for r in res if isinstance(r, torch.Tensor)], [x.grad for x in xs]))
    return out


def _assert_same(pair):
    (v0, g0), (v1, g1) = pair
    for a, b in zip(v1 + g1, v0 + g0):
        torch.testing.assert_close(a, b.float(), **TOL)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_compute_approx_kl(utils, estimator):
    mask = awkward_mask(B, T)
    logp, ref = -torch.rand(B, T) * 3, -torch.rand(B, T) * 3
    _assert_same(_both(lambda a: utils.compute_approx_kl(a, ref, kl_estimator=estimator) * mask, logp))
    assert fast.call_counts() == {"compute_approx_kl": 1}


def test_compute_reward(utils):
    """The experience maker's reward shaping: -kl_coef * kl everywhere, the clipped score at the last valid token."""
    mask = awkward_mask(B, T)
    r, kl = torch.randn(B) * 3, torch.randn(B, T)
    _assert_same(_both(lambda k: utils.compute_reward(r, 0.05, k, action_mask=mask, reward_clip_range=(-2.0, 2.0)),
                       kl))
    assert fast.call_counts() == {"compute_reward": 1}


def test_policy_and_value_loss_modules(loss):
    torch.manual_seed(2)
    mask = awkward_mask(B, T)
    old, adv = -torch.rand(B, T) * 2, torch.randn(B, T)
    logp = old + 0.3 * torch.randn(B, T)
    _assert_same(_both(lambda lp: loss.PolicyLoss(0.2, 0.28, dual_clip=3.0)(lp, old, adv, mask)[:3], logp))
    old_v, ret = torch.randn(B, T), torch.randn(B, T)
    _assert_same(_both(lambda v: loss.ValueLoss(0.2)(v, old_v, ret, mask), old_v + 0.4 * torch.randn(B, T)))
    assert fast.call_counts() == {"PolicyLoss": 1, "ValueLoss": 1}


def test_actor_log_probs_and_entropy(utils):
    """Actor.forward's log_probs_from_logits / compute_entropy (on temperature-scaled fp32 logits)."""
    logits, labels = torch.randn(B, T, V), torch.randint(0, V, (B, T))
    _assert_same(_both(lambda z: utils.log_probs_from_logits(z, labels), logits))
    eager = getattr(utils.compute_entropy, "_torchdynamo_orig_callable", utils.compute_entropy)  # skip the compile
    z0, z1 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    want = eager(z0)
    with fast.enabled():
        got = utils.compute_entropy(z1)
    torch.testing.assert_close(got, want, **TOL)
    want.sum().backward()
    got.sum().backward()
    torch.testing.assert_close(z1.grad, z0.grad, **TOL)
    assert fast.call_counts() == {"log_probs_from_logits": 1, "compute_entropy": 1}


def test_gae_method_matches_experience_maker():
    """The experience maker's GAE (the method's installed source; its module needs Ray) vs what enable() puts on
    RemoteExperienceMaker: same advantages and returns."""
    theirs = source_function("openrlhf", "trainer/ppo_utils/experience_maker.py",
                             "RemoteExperienceMaker.get_advantages_and_returns")
    values, rewards, mask = torch.randn(B, T), torch.randn(B, T), awkward_mask(B, T).float()
    want = theirs(None, values, rewards, mask, 0.97, 0.9)
    got = fast.gae_method(None, values, rewards, mask, 0.97, 0.9)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)


def test_rebinds_copies_and_disable_restores(utils, loss):
    """Modules that imported the names (openrlhf.models re-exports PolicyLoss) see ours; disable restores all."""
    models = sys.modules.get("openrlhf.models")
    originals = {n: getattr(utils, n) for n in ("compute_approx_kl", "compute_reward", "log_probs_from_logits",
                                                "compute_entropy")}
    policy, value = loss.PolicyLoss, loss.ValueLoss
    fast.enable()
    assert loss.PolicyLoss is not policy and issubclass(loss.PolicyLoss, torch.nn.Module)
    if models is not None and getattr(models, "PolicyLoss", None) is not None:
        assert models.PolicyLoss is loss.PolicyLoss
    if "openrlhf.trainer.ppo_utils.experience_maker" not in sys.modules:      # needs Ray: said, not hidden
        assert any("RemoteExperienceMaker" in s for s in fast.skipped())
    fast.disable()
    assert all(getattr(utils, n) is f for n, f in originals.items())
    assert loss.PolicyLoss is policy and loss.ValueLoss is value


def test_untested_version_raises_and_patches_nothing(utils, monkeypatch):
    before = utils.compute_approx_kl
    monkeypatch.setattr(_patch, "installed_version", lambda dist: "0.12.0")
    with pytest.raises(RuntimeError, match=r"checked against openrlhf.*found openrlhf 0\.12\.0"):
        fast.enable()
    assert utils.compute_approx_kl is before


def test_peer_that_does_not_import_is_one_clear_error(monkeypatch):
    """OpenRLHF's ``openrlhf.models`` imports flash-attn: a missing dependency of the peer's is named, not a bare
    traceback from inside the peer, and nothing is patched."""
    def broken():
        raise ModuleNotFoundError("No module named 'flash_attn'")
    integration = _patch.Integration("openrlhf", "openrlhf", fast.SUPPORTED, broken)
    with pytest.raises(ImportError, match=r"integrations\.openrlhf: openrlhf 0\.11\.\d+ does not import here "
                                          r"\(No module named 'flash_attn'\).*rlhf_fast\.compat\.openrlhf"):
        integration.enable()
    assert not integration.is_enabled
