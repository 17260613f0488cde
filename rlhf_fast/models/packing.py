"""Padding-free decoder forward: the real tokens of a padded batch packed into one sequence.

For ``input_ids`` [B, L] with attention mask m, the n = sum(m) real tokens are laid end to end in row-major order
as one sequence [1, n] whose position ids restart at 0 in every row (``p = cumsum(m) - 1``, as the padded forward
uses), and the decoder runs on it with no attention mask. transformers (>= 4.54) then reads the row boundaries from
the position ids (a position that does not follow its predecessor by 1 starts a new sequence) and attends within
each row only: varlen kernels under flash-attention, a block-diagonal causal mask under sdpa / eager. The hidden
states are scattered back to [B, L, H] (0 at padding). The math is the padded forward's; the decoder's matrix
FLOPs fall from B * L positions to n.

Attention is the trade: flash-attention's varlen kernels cost sum_b len_b^2 like the padded forward, while sdpa /
eager build an n x n mask and attend over all of it, so on CPU packing pays only when padding is most of the batch.
``resolve_packing("auto", model)`` therefore packs under flash-attention only.

Supported where the architecture takes the packed form exactly (``PACKABLE_MODEL_TYPES``, each checked against the
padded forward in tests/test_packing.py); OPT is not among them: its decoder builds its causal mask without the
position ids, so a packed batch would attend across rows.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["PACKABLE_MODEL_TYPES", "PACKING_ATTENTION", "PACK_CHOICES", "supports_packing", "resolve_packing",
           "packed_forward"]

PACKABLE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gpt2"})
PACKING_ATTENTION = frozenset({"sdpa", "eager", "flash_attention_2", "flash_attention_3"})
PACK_CHOICES = ("auto", "on", "off")


def _attention(model: nn.Module) -> str:
    return str(getattr(model.config, "_attn_implementation", None) or "eager")


def supports_packing(model: nn.Module) -> bool:
    """The model's family and attention implementation take the packed form exactly."""
    return model.config.model_type in PACKABLE_MODEL_TYPES and _attention(model) in PACKING_ATTENTION


def resolve_packing(choice: str, model: nn.Module) -> bool:
    """``"on"``: pack (a ValueError naming ``pack_sequences`` if the model cannot); ``"off"``: never; ``"auto"``:
    pack where it saves work whatever the lengths, i.e. under flash-attention's varlen kernels."""
    if choice not in PACK_CHOICES:
        raise ValueError(f"pack_sequences must be one of {PACK_CHOICES}, got {choice!r}")
    if choice == "on" and not supports_packing(model):
        raise ValueError(f"pack_sequences=on: model type {model.config.model_type!r} with attention "
                         f"{_attention(model)!r} has no exact packed form (supported: "
                         f"{', '.join(sorted(PACKABLE_MODEL_TYPES))} under {', '.join(sorted(PACKING_ATTENTION))})")
    if choice == "auto":
        return supports_packing(model) and _attention(model).startswith("flash_attention")
    return choice == "on"


def packed_forward(decoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``decoder``'s last hidden states ``[B, L, H]`` from one packed sequence of the real tokens (0 at padding)."""
    real = attention_mask.bool()
    position_ids = attention_mask.long().cumsum(-1) - 1
    hidden = decoder(input_ids=input_ids[real][None], position_ids=position_ids[real][None],
                     use_cache=False).last_hidden_state[0]                                    # [n, H]
    return hidden.new_zeros(*input_ids.shape, hidden.shape[-1]).index_put((real,), hidden)
