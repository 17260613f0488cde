"""A transformer backbone with a scalar head: one value per token, ``V[b, t] = w . h[b, t] + c``.

The critic of PPO (a separate model, or a head on the policy's own backbone when ``backbone`` is shared) and,
read at the last real token, the reward model (:mod:`rlhf_fast.models.reward_model`).
"""
from __future__ import annotations

import torch
from torch import nn

from rlhf_fast.models.packing import mask_positions


def base_model(model: nn.Module) -> nn.Module:
    """The decoder stack of a HF causal LM (``model.model`` for Llama-style models; through a peft wrapper), or
    ``model`` itself."""
    from rlhf_fast.models.lora import is_lora
    model = model.get_base_model() if is_lora(model) else model
    return getattr(model, getattr(model, "base_model_prefix", "model"), model)


class ScalarHeadModel(nn.Module):
    """``forward(input_ids [B,L], attention_mask [B,L]) -> [B, L]`` fp32 per-token scalars."""

    def __init__(self, backbone: nn.Module, hidden_size: int | None = None):
        super().__init__()
        self.backbone = backbone
        hidden_size = hidden_size or backbone.config.hidden_size
        self.head = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.head.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)

    @property
    def config(self):
        return self.backbone.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask.long(),
                               position_ids=mask_positions(attention_mask)).last_hidden_state
        return self.from_hidden(hidden)

    def from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head on the backbone's last hidden states ``[B, L, H]`` -> ``[B, L]`` fp32."""
        return self.head(hidden.float()).squeeze(-1)


class ValueModel(ScalarHeadModel):
    """The PPO critic. :meth:`from_reward_model` copies a reward model (InstructGPT's value initialisation)."""

    @classmethod
    def from_reward_model(cls, reward_model: ScalarHeadModel) -> "ValueModel":
        import copy
        critic = cls.__new__(cls)
        nn.Module.__init__(critic)
        critic.backbone = copy.deepcopy(reward_model.backbone)
        critic.head = copy.deepcopy(reward_model.head)
        return critic

    @classmethod
    def on_policy(cls, policy: nn.Module) -> "ValueModel":
        """A value head sharing the policy's backbone (its gradients flow into the policy)."""
        return cls(base_model(policy))
