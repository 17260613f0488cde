"""Tiny Llama-architecture causal LMs built from a config (no hub downloads).

head_dim is 64 (vLLM's CPU attention backend rejects 16). ``save_pretrained`` writes safetensors plus the
tokenizer, so the directory loads in HF ``from_pretrained`` and in vLLM alike.
"""
from __future__ import annotations

import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama_config(vocab_size: int, hidden_size: int = 128, num_layers: int = 2, intermediate_size: int = 256,
                      max_position_embeddings: int = 128, head_dim: int = 64, tie_word_embeddings: bool = False,
                      pad_token_id: int = 0, bos_token_id: int = 1, eos_token_id: int = 2) -> LlamaConfig:
    if hidden_size % head_dim:
        raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of head_dim ({head_dim})")
    heads = hidden_size // head_dim
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                       num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=heads,
                       head_dim=head_dim, max_position_embeddings=max_position_embeddings,
                       tie_word_embeddings=tie_word_embeddings, pad_token_id=pad_token_id,
                       bos_token_id=bos_token_id, eos_token_id=eos_token_id, torch_dtype="float32")


def build_tiny_llama(config: LlamaConfig, seed: int = 0) -> LlamaForCausalLM:
    """A freshly initialised model, deterministic in ``seed``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).float()


def save_model(model, tokenizer, path: str | os.PathLike) -> None:
    """``save_pretrained`` (safetensors) for the model and its tokenizer, into one directory."""
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
