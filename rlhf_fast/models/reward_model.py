"""Reward model: a HF backbone with a scalar head, read at the last real (non-pad) token.

``r(x, y) = w . h[b, last(b)] + c`` with ``last(b)`` the last position where ``attention_mask[b]`` is true.
Saved as a HF directory (backbone, safetensors) plus ``score_head.safetensors``.
"""
from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from rlhf_fast.models.value_model import ScalarHeadModel, base_model

HEAD_FILE = "score_head.safetensors"


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last true position of each row of a ``[B, L]`` mask (0 for an empty row)."""
    L = attention_mask.shape[1]
    pos = torch.arange(L, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), pos, -1).amax(dim=1).clamp_min(0)


class RewardModel(ScalarHeadModel):
    """``score(input_ids, attention_mask) -> [B]`` fp32."""

    @classmethod
    def from_causal_lm(cls, model) -> "RewardModel":
        """Reuse a causal LM's decoder stack (e.g. the SFT policy, as InstructGPT does) with a fresh head."""
        return cls(base_model(model))

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        values = self(input_ids, attention_mask)
        return values.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)

    def save_pretrained(self, path: str | os.PathLike, tokenizer=None) -> None:
        os.makedirs(path, exist_ok=True)
        self.backbone.save_pretrained(path, safe_serialization=True)
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, os.path.join(path, HEAD_FILE))
        if tokenizer is not None:
            tokenizer.save_pretrained(path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "RewardModel":
        """Load a directory written by :meth:`save_pretrained`; a plain HF causal-LM directory (no head file)
        gets its decoder stack and a fresh head."""
        backbone = base_model(AutoModel.from_pretrained(path, dtype=torch.float32))
        model = cls(backbone)
        head = os.path.join(path, HEAD_FILE)
        if os.path.exists(head):
            model.head.load_state_dict(load_file(head))
        return model
