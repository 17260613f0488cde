"""Llama-architecture models built from a config (random weights, no downloads) for the rollout and
weight-sync benchmarks."""
import torch


def llama(hidden: int, layers: int, vocab: int, intermediate: int, max_len: int = 512, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                      head_dim=64, max_position_embeddings=max_len, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float().eval()


def n_params(hidden: int, layers: int, vocab: int, intermediate: int) -> int:
    """Parameters of ``llama(...)``: embeddings + lm_head, per layer q/k/v/o + gate/up/down + 2 norms, final norm."""
    return 2 * vocab * hidden + layers * (4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden) + hidden
