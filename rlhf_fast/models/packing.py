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

__all__ = ["PACKABLE_MODEL_TYPES", "PACKING_ATTENTION", "PACK_CHOICES", "mask_positions", "packing_problem",
           "supports_packing", "resolve_packing", "packed_forward"]

PACKABLE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gpt2"})
PACKING_ATTENTION = frozenset({"sdpa", "eager", "flash_attention_2", "flash_attention_3"})
PACK_CHOICES = ("auto", "on", "off")


def mask_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``[B, L]`` counting each row's real tokens from 0 (``cumsum(m) - 1``, 0 at left padding): what
    the padded and the packed forwards both use, so a left-padded row scores like an unpadded one."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _attention(model: nn.Module) -> str:
    return str(getattr(model.config, "_attn_implementation", None) or "eager")


def packing_problem(model_type: str, attention: str = "sdpa") -> str | None:
    """Why a model family / attention implementation has no exact packed form, or None (the one rule the trainers
    and the CLI's pre-start check read; a config.json read before loading has no attention yet: the default)."""
    if model_type not in PACKABLE_MODEL_TYPES:
        return (f"model type {model_type!r} has no exact packed form (supported: "
                f"{', '.join(sorted(PACKABLE_MODEL_TYPES))})")
    if attention not in PACKING_ATTENTION:
        return f"attention {attention!r} has no packed form (supported: {', '.join(sorted(PACKING_ATTENTION))})"
    return None


def supports_packing(model: nn.Module) -> bool:
    """The model's family and attention implementation take the packed form exactly."""
    return packing_problem(model.config.model_type, _attention(model)) is None


def resolve_packing(choice: str, model: nn.Module) -> bool:
    """``"on"``: pack (a ValueError naming ``pack_sequences`` if the model cannot); ``"off"``: never; ``"auto"``:
    pack where it saves work whatever the lengths, i.e. under flash-attention's varlen kernels."""
    if choice not in PACK_CHOICES:
        raise ValueError(f"pack_sequences must be one of {PACK_CHOICES}, got {choice!r}")
    problem = packing_problem(model.config.model_type, _attention(model))
    if choice == "on" and problem:
        raise ValueError(f"pack_sequences=on: {problem}")
    if choice == "auto":
        return problem is None and _attention(model).startswith("flash_attention")
    return choice == "on"


def packed_forward(decoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``decoder``'s last hidden states ``[B, L, H]`` from one packed sequence of the real tokens (0 at padding)."""
    real = attention_mask.bool()
    position_ids = mask_positions(attention_mask)
    hidden = decoder(input_ids=input_ids[real][None], position_ids=position_ids[real][None],
                     use_cache=False).last_hidden_state[0]                                    # [n, H]
    return hidden.new_zeros(*input_ids.shape, hidden.shape[-1]).index_put((real,), hidden)
