"""Llama-architecture models built from a config (random weights, no downloads) for the rollout and
weight-sync benchmarks."""
from rlhf_fast.models.tiny import build_tiny_llama, tiny_llama_config


def llama(hidden: int, layers: int, vocab: int, intermediate: int, max_len: int = 512, seed: int = 0):
    cfg = tiny_llama_config(vocab, hidden_size=hidden, num_layers=layers, intermediate_size=intermediate,
                            max_position_embeddings=max_len)
    return build_tiny_llama(cfg, seed=seed).eval()


def n_params(hidden: int, layers: int, vocab: int, intermediate: int) -> int:
    """Parameters of ``llama(...)``: embeddings + lm_head, per layer q/k/v/o + gate/up/down + 2 norms, final norm."""
    return 2 * vocab * hidden + layers * (4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden) + hidden
