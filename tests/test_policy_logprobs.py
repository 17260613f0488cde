"""policy_logprobs over tiny HF causal LMs (head_dim 64) against model(...).logits -> log_softmax -> gather.

fp32 models; tolerance 1e-5 abs on logp/entropy (the fused head and HF's lm_head do the same fp32 dot products
in a different order: ~1e-7 relative per logit, lse over 300 columns); parameter gradients within 1e-5
relative Frobenius error (measured ~5e-7).
"""
import pytest
import torch
from transformers import (CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM, LlamaConfig,
                          LlamaForCausalLM)

from rlhf_fast.models import policy_logprobs

VOCAB = 300
COMMON = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=2, head_dim=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)


def build(kind: str) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(1)
        if kind == "llama":
            model = LlamaForCausalLM(LlamaConfig(**COMMON))
        elif kind == "llama-tied":
            model = LlamaForCausalLM(LlamaConfig(**COMMON, tie_word_embeddings=True))
        elif kind == "gemma2-softcap":    # final_logit_softcapping: z -> c tanh(z / c); c small so it bites
            model = Gemma2ForCausalLM(Gemma2Config(**COMMON, final_logit_softcapping=1.5, attn_implementation="eager"))
        elif kind == "cohere-logit-scale":
            model = CohereForCausalLM(CohereConfig(**COMMON, logit_scale=0.5))
        else:
            raise ValueError(kind)
    return model.float()


def batch():
    B, L = 3, 12
    ids = torch.randint(3, VOCAB, (B, L))
    attn = torch.ones(B, L, dtype=torch.long)
    attn[1, :4] = 0                        # left padding
    attn[2, -3:] = 0                       # right padding
    resp = torch.zeros(B, L, dtype=torch.bool)
    resp[:, 6:] = True
    return ids, attn, resp & attn.bool()


def unfused(model, ids, attn, resp, temperature):
    """The explicit path: full logits, log_softmax, gather; position ids from the mask as in HF generate."""
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits.float() / temperature
    logsm = torch.log_softmax(logits[:, :-1], dim=-1)
    logp = torch.nn.functional.pad(logsm.gather(-1, ids[:, 1:, None]).squeeze(-1), (1, 0))
    ent = torch.nn.functional.pad(-(logsm.exp() * logsm).sum(-1), (1, 0))
    return logp * resp, ent * resp


def check_against_unfused(kind, backend):
    model = build(kind)
    ids, attn, resp = batch()
    logp, ent = policy_logprobs(model, ids, attn, resp, temperature=0.8, return_entropy=True, backend=backend)
    assert logp.shape == ent.shape == ids.shape and logp.dtype == torch.float32
    assert torch.equal(logp[~resp], torch.zeros_like(logp[~resp]))
    (logp.sum() + 0.3 * ent.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    rlogp, rent = unfused(model, ids, attn, resp, 0.8)
    torch.testing.assert_close(logp, rlogp, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent, rent, rtol=0, atol=1e-5)
    (rlogp.sum() + 0.3 * rent.sum()).backward()
    ref = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref.keys() and len(ref) > 0
    for n in ref:   # relative Frobenius error: elementwise, tiny entries carry the fp32 reordering noise
        assert (grads[n] - ref[n]).norm() <= 1e-5 * ref[n].norm(), n


@pytest.mark.parametrize("kind", ["llama", "llama-tied", "gemma2-softcap", "cohere-logit-scale"])
def test_matches_unfused_with_grads(kind):
    check_against_unfused(kind, "auto")


def test_every_backend(backend):
    check_against_unfused("llama", backend)


def test_left_padding_scores_like_unpadded():
    model = build("llama")
    ids = torch.randint(3, VOCAB, (1, 8))
    resp = torch.zeros(1, 8, dtype=torch.bool)
    resp[:, 4:] = True
    alone = policy_logprobs(model, ids, torch.ones_like(ids), resp)
    padded_ids = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    padded_attn = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    padded_resp = torch.cat([torch.zeros(1, 3, dtype=torch.bool), resp], 1)
    padded = policy_logprobs(model, padded_ids, padded_attn, padded_resp)
    torch.testing.assert_close(padded[:, 3:], alone, rtol=0, atol=1e-5)
    assert (alone[resp] < 0).all()


def test_bad_input():
    model = build("llama")
    ids, attn, resp = batch()
    first = resp.clone()
    first[0, 0] = True
    with pytest.raises(ValueError, match="response_mask"):
        policy_logprobs(model, ids, attn, first)
    with pytest.raises(ValueError, match="attention_mask"):
        policy_logprobs(model, ids, attn[:, 1:], resp)
    with pytest.raises(TypeError, match="input_ids"):
        policy_logprobs(model, ids.float(), attn, resp)
