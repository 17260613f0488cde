"""Shared by tests/test_rollout.py and tests/test_weight_sync.py: a tiny Llama built from a config
(head_dim 64: the CPU attention backend rejects 16) and ONE in-process vLLM engine per test session
(engine start-up dominates these tests' time)."""
from __future__ import annotations

import functools
import importlib.util

import torch

HAS_VLLM = importlib.util.find_spec("vllm") is not None
PAD, BOS, EOS = 0, 1, 2
VOCAB = 256
MAX_MODEL_LEN = 128


def tiny_llama(seed: int = 0, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                      max_position_embeddings=MAX_MODEL_LEN, tie_word_embeddings=tie,
                      initializer_range=0.1,  # peaked logits: greedy argmax far from ties
                      bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg).float()


@functools.lru_cache(maxsize=None)
def shared_model():
    return tiny_llama(0)


_ENGINE = None


def shared_engine():
    """One in-process VLLMEngine over shared_model(), started on first use. Each test module closes it at its
    end (``close_shared_engine``): closing ANY in-process engine tears down vLLM's process-global distributed
    state, so an engine must not outlive a module in which other tests start and close their own."""
    global _ENGINE
    if _ENGINE is None:
        from rlhf_fast.rollout import VLLMEngine
        _ENGINE = VLLMEngine(shared_model(), max_model_len=MAX_MODEL_LEN, seed=0, gpu_memory_utilization=0.1)
    return _ENGINE


def close_shared_engine() -> None:
    global _ENGINE
    if _ENGINE is not None:
        _ENGINE.close()
        _ENGINE = None


def prompts(n: int = 6, seed: int = 1) -> list[list[int]]:
    """Prompts of different lengths (1..~20 tokens) from the non-special ids."""
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 3, 7, 12, 20, 5, 9, 16][:n] + [4] * max(0, n - 8)
    return [torch.randint(3, VOCAB, (L,), generator=g).tolist() for L in lengths]


def learner_logprobs(model, batch, temperature: float = 1.0, top_k: int | None = None) -> torch.Tensor:
    """log π_τ(response token) under the learner, with the engines' processing: logits / τ, then top-k."""
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
    P = batch.prompt_ids.shape[1]
    logits = logits[:, P - 1:-1] / temperature
    if top_k:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    lp = logits.log_softmax(-1).gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
    return torch.where(batch.response_mask, lp, torch.zeros_like(lp)).float()


def sgd_step(model, lr: float = 0.5, params=None, seed: int = 0) -> None:
    """One optimizer step of a language-model loss on a random batch."""
    params = list(model.parameters()) if params is None else params
    opt = torch.optim.SGD(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (4, 16), generator=g)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
