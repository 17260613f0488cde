"""Tiny causal LMs of common architectures, built from their HF configs (no hub downloads).

    ARCHITECTURES = llama, qwen2, qwen3, mistral, phi3, gemma2, gpt2, opt
    tiny_config(arch, vocab_size, tie_word_embeddings=...)  -> that family's config, geometry below
    build_tiny(config, seed)                                 -> a freshly initialised fp32 model

Geometry (every family): ``num_layers`` layers, ``hidden_size`` hidden, head_dim 64 (vLLM's CPU attention
backend rejects 16), so ``hidden_size // 64`` query heads; Llama-style families use half as many KV heads
(GQA) where that divides. ``TIE_CHOICES[arch]``: the ``tie_word_embeddings`` values the architecture allows
(Gemma-2 always ties its head to the embedding). ``save_pretrained`` writes safetensors plus the tokenizer, so
the directory loads in HF ``from_pretrained`` and in vLLM alike.
"""
from __future__ import annotations

import os

import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig

ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gpt2", "opt")
TIE_CHOICES = {arch: (False, True) for arch in ARCHITECTURES} | {"gemma2": (True,)}

# family -> (config class, the family's own spelling of the shared keys)
_FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "phi3": ("Phi3Config", {}),
    # eager: HF's sdpa path for Gemma-2 drops attn_logit_softcapping (vLLM applies it): 1e-4 nats apart
    "gemma2": ("Gemma2Config", {"attn_implementation": "eager"}),
}


def tiny_config(arch: str, vocab_size: int, hidden_size: int = 128, num_layers: int = 2,
                intermediate_size: int = 256, max_position_embeddings: int = 128, head_dim: int = 64,
                tie_word_embeddings: bool = False, initializer_range: float = 0.02, pad_token_id: int = 0,
                bos_token_id: int = 1, eos_token_id: int = 2, kv_heads: int | None = None) -> PretrainedConfig:
    """The HF config of a tiny ``arch`` model (see module docstring); ``kv_heads`` overrides the GQA default."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    if tie_word_embeddings not in TIE_CHOICES[arch]:
        raise ValueError(f"{arch} allows tie_word_embeddings in {TIE_CHOICES[arch]}, got {tie_word_embeddings!r}")
    if hidden_size % head_dim:
        raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of head_dim ({head_dim})")
    heads = hidden_size // head_dim
    common = dict(vocab_size=vocab_size, tie_word_embeddings=tie_word_embeddings,
                  initializer_range=initializer_range, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                  eos_token_id=eos_token_id, torch_dtype="float32")
    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=hidden_size, n_layer=num_layers, n_head=heads, n_inner=intermediate_size,
                                       n_positions=max_position_embeddings, **common)
    if arch == "opt":
        return transformers.OPTConfig(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=heads,
                                      ffn_dim=intermediate_size, word_embed_proj_dim=hidden_size,
                                      max_position_embeddings=max_position_embeddings, **common)
    cls_name, extra = _FAMILIES[arch]
    kv_heads = kv_heads or (heads // 2 if heads % 2 == 0 else heads)
    return getattr(transformers, cls_name)(
        hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=num_layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=max_position_embeddings, **extra, **common)


def tiny_llama_config(vocab_size: int, hidden_size: int = 128, num_layers: int = 2, intermediate_size: int = 256,
                      max_position_embeddings: int = 128, head_dim: int = 64, tie_word_embeddings: bool = False,
                      pad_token_id: int = 0, bos_token_id: int = 1, eos_token_id: int = 2) -> LlamaConfig:
    """A tiny Llama config with as many KV heads as query heads (multi-head attention)."""
    return tiny_config("llama", vocab_size, hidden_size, num_layers, intermediate_size, max_position_embeddings,
                       head_dim, tie_word_embeddings, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                       eos_token_id=eos_token_id, kv_heads=max(1, hidden_size // head_dim))


def build_tiny(config: PretrainedConfig, seed: int = 0) -> torch.nn.Module:
    """A freshly initialised fp32 causal LM of ``config``'s architecture, deterministic in ``seed``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config).float()


build_tiny_llama = build_tiny


def save_model(model, tokenizer, path: str | os.PathLike) -> None:
    """``save_pretrained`` (safetensors) for the model and its tokenizer, into one directory."""
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
