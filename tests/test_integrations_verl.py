"""rlhf_fast.integrations.verl inside verl 0.9.1 (imported by tests/peers): the names registered in verl's own
registries and the replaced GAE / fused log-prob hook give verl's values and gradients, counted."""
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from _rl_inputs import awkward_mask
from peers import source_function, verl_module
from rlhf_fast.integrations import _patch
from rlhf_fast.integrations import verl as fast

B, T, G = 12, 9, 4
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def core():
    return verl_module()


@pytest.fixture(autouse=True)
def _off():
    fast.disable()
    fast.reset_counts()
    yield
    fast.disable()


def _outcome_inputs():
    """Scores at each row's last valid token; groups of G interleaved (uids in any order, as after a shuffle)."""
    mask = awkward_mask(B, T).float()
    mask[:, 0] = 1.0                                    # every response has a token
    rewards = torch.zeros(B, T)
    last = T - 1 - mask.flip(-1).argmax(-1)
    rewards[torch.arange(B), last] = torch.randn(B)
    index = np.array([f"uid{i % (B // G)}" for i in range(B)], dtype=object)
    return rewards, mask, index


@pytest.mark.parametrize("name,config", [
    ("grpo", {"norm_adv_by_std_in_grpo": True}), ("grpo", {"norm_adv_by_std_in_grpo": False}),
    ("rloo", {}), ("reinforce_plus_plus", {"gamma": 0.9})])
def test_registered_estimators_match_verl(core, name, config):
    rewards, mask, index = _outcome_inputs()
    cfg = OmegaConf.create(config)
    kwargs = {"norm_adv_by_std_in_grpo": config["norm_adv_by_std_in_grpo"]} if name == "grpo" else {}
    want = core.get_adv_estimator_fn(name)(token_level_rewards=rewards.clone(), response_mask=mask, index=index,
                                           config=cfg, **kwargs)
    with fast.enabled():
        got = core.get_adv_estimator_fn(f"rlhf_fast_{name}")(token_level_rewards=rewards.clone(),
                                                             response_mask=mask, index=index, config=cfg)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.float(), **TOL)
    assert fast.call_counts() == {f"rlhf_fast_{name}": 1}


@pytest.mark.parametrize("name", ["grpo", "rloo", "reinforce_plus_plus", "gae"])
def test_compute_advantage_entry_point(core, name):
    """verl's own ``compute_advantage`` (ray_trainer; its module needs torchdata and Ray, so the function is
    compiled from the installed source over the real core_algos and DataProto) with ``rlhf_fast_<name>``
    selected gives what it gives with ``<name>``; ``gae`` runs ours under verl's own name."""
    protocol = verl_module("protocol")
    compute_advantage = source_function("verl", "trainer/ppo/ray_trainer.py", "compute_advantage", np=np,
                                        core_algos=core, AdvantageEstimator=core.AdvantageEstimator,
                                        DataProto=protocol.DataProto, AlgoConfig=object)
    rewards, mask, index = _outcome_inputs()
    config = OmegaConf.create({"gamma": 0.9, "use_pf_ppo": False})

    def run(estimator):
        data = protocol.DataProto.from_dict(
            tensors={"token_level_rewards": rewards.clone(), "response_mask": mask, "values": torch.randn(B, T,
                     generator=torch.Generator().manual_seed(5))}, non_tensors={"uid": index})
        out = compute_advantage(data, estimator, gamma=0.9, lam=0.95, config=config)
        return out.batch["advantages"], out.batch["returns"]
    want = run(name)
    with fast.enabled():
        got = run(name if name == "gae" else f"rlhf_fast_{name}")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.float(), **TOL)
    assert sum(fast.call_counts().values()) == 1


def test_unequal_groups_raise(core):
    rewards, mask, index = _outcome_inputs()
    index[0] = "lonely"
    with fast.enabled(), pytest.raises(ValueError, match="same number of rows"):
        core.get_adv_estimator_fn("rlhf_fast_grpo")(rewards, mask, index=index)


def test_gae_through_the_name_compute_advantage_calls(core):
    """verl's compute_advantage calls ``core_algos.compute_gae_advantage_return`` for ``gae``: that name (and the
    registry entry) run the fused GAE, with verl's values at every position."""
    rewards, values, mask = torch.randn(B, T), torch.randn(B, T), awkward_mask(B, T).float()
    want = core.compute_gae_advantage_return(rewards, values, mask, 0.95, 0.9)
    with fast.enabled():
        got = core.compute_gae_advantage_return(rewards, values, mask, 0.95, 0.9)
        assert core.get_adv_estimator_fn("gae") is core.compute_gae_advantage_return
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)
    assert fast.call_counts() == {"compute_gae_advantage_return": 1}


def test_registered_policy_loss_matches_vanilla(core):
    torch.manual_seed(3)
    mask = awkward_mask(B, T).float()
    old = -torch.rand(B, T) * 2
    logp0, adv = old + 0.3 * torch.randn(B, T), torch.randn(B, T)
    config = OmegaConf.create(dict(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0,
                                   global_batch_info={}))
    results = []
    for name in ("vanilla", "rlhf_fast_vanilla"):
        logp = logp0.clone().requires_grad_()
        with fast.enabled():
            loss, metrics = core.get_policy_loss_fn(name)(old, logp, adv, mask, "seq-mean-token-mean", config)
        loss.backward()
        results.append((loss.detach(), logp.grad, metrics))
    (l0, g0, m0), (l1, g1, m1) = results
    torch.testing.assert_close(l1, l0, **TOL)
    torch.testing.assert_close(g1, g0, **TOL)
    for key in m0:
        assert abs(float(m1[key]) - float(m0[key])) < 1e-5, key
    assert fast.call_counts() == {"rlhf_fast_vanilla": 1}


@pytest.mark.parametrize("name", ["k1", "abs", "k2", "low_var_kl", "k3+"])
def test_kl_penalty_and_value_loss_through_verls_loss_module(core, name):
    """verl's worker losses import ``kl_penalty`` and ``compute_value_loss`` by name: with the integration on,
    those names (and core_algos') run rlhf_fast with verl's values and gradients."""
    losses = verl_module("workers.utils.losses")
    torch.manual_seed(4)
    mask = awkward_mask(B, T).bool()
    logp0, ref = -torch.rand(B, T) * 2, -torch.rand(B, T) * 2
    v0, old_v, ret = torch.randn(B, T), torch.randn(B, T), torch.randn(B, T)
    vpred0 = old_v + 0.3 * torch.randn(B, T)
    results = []
    for on in (False, True):
        logp, vpred = logp0.clone().requires_grad_(), vpred0.clone().requires_grad_()
        with fast.enabled() if on else torch.enable_grad():
            assert (losses.kl_penalty is core.kl_penalty) and (losses.compute_value_loss is core.compute_value_loss)
            kl = losses.kl_penalty(logprob=logp, ref_logprob=ref, kl_penalty=name)
            vf, clipfrac = losses.compute_value_loss(vpreds=vpred, values=old_v, returns=ret, response_mask=mask,
                                                     cliprange_value=0.2, loss_agg_mode="token-mean")
        ((kl * mask).sum() + vf).backward()
        results.append((kl.detach(), vf.detach(), clipfrac, logp.grad, vpred.grad))
    for g, w in zip(results[1], results[0]):
        torch.testing.assert_close(g, w, **TOL)
    assert fast.call_counts() == {"kl_penalty": 1, "compute_value_loss": 1}


def test_fused_linear_hook_matches_verl():
    """verl's patched model forward imports FusedLinearForPPO at call time: with the integration on that name is
    ours, with verl's log-probs, entropy and gradients."""
    verl_module("utils.experimental.torch_functional")
    from verl.utils.experimental import torch_functional as tf
    original = tf.FusedLinearForPPO
    torch.manual_seed(0)
    h0, w0, ids = torch.randn(2, 7, 16), torch.randn(50, 16) * 0.5, torch.randint(0, 50, (2, 7))
    results = []
    for on in (False, True):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with fast.enabled() if on else torch.enable_grad():
            lp, ent = tf.FusedLinearForPPO()(hidden_states=h, vocab_weights=w, input_ids=ids, temperature=0.8)
        (lp.sum() + 0.5 * ent.sum()).backward()
        results.append((lp.detach(), ent.detach(), h.grad, w.grad))
    for g, w in zip(results[1], results[0]):
        torch.testing.assert_close(g, w.float(), rtol=1e-5, atol=1e-5)
    assert tf.FusedLinearForPPO is original
    assert fast.call_counts() == {"FusedLinearForPPO": 1}


def test_disable_restores_exactly(core):
    adv_before, loss_before = dict(core.ADV_ESTIMATOR_REGISTRY), dict(core.POLICY_LOSS_REGISTRY)
    named = {n: getattr(core, n) for n in ("compute_gae_advantage_return", "kl_penalty", "compute_value_loss")}
    fast.enable()
    assert all(getattr(core, n) is not f for n, f in named.items())
    assert set(fast.ADV_ESTIMATORS) <= set(core.ADV_ESTIMATOR_REGISTRY)
    assert "rlhf_fast_vanilla" in core.POLICY_LOSS_REGISTRY
    fast.disable()
    assert core.ADV_ESTIMATOR_REGISTRY == adv_before and core.POLICY_LOSS_REGISTRY == loss_before
    assert all(getattr(core, n) is f for n, f in named.items())


def test_untested_version_raises_and_patches_nothing(core, monkeypatch):
    monkeypatch.setattr(_patch, "installed_version", lambda dist: "0.10.0")
    with pytest.raises(RuntimeError, match=r"checked against verl.*found verl 0\.10\.0"):
        fast.enable()
    assert "rlhf_fast_grpo" not in core.ADV_ESTIMATOR_REGISTRY
