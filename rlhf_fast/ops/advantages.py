"""Critic-free advantage estimators: GRPO, RLOO, REINFORCE++.

Sequence-level scores ``s[B]`` come in groups of ``G = group_size`` consecutive rows (the G samples of one
prompt, as TRL and verl lay them out); ``mean_g``, ``std_g`` are over a row's group, std unbiased::

    grpo, scale="group":  A_i = (s_i - mean_g) / (std_g + eps)          (GRPO, Shao et al. 2024)
    grpo, scale="batch":  A_i = (s_i - mean_g) / (std_batch + eps)      (TRL's scale_rewards="batch")
    grpo, scale="none":   A_i =  s_i - mean_g                           (Dr. GRPO)
    rloo:                 A_i = s_i - (sum_g - s_i) / (G - 1) = G / (G - 1) * (s_i - mean_g)

With ``G == 1`` GRPO uses mean 0 and std 1 (verl's convention: a lone sample keeps its score); RLOO needs
G >= 2. Token-level REINFORCE++ returns are GAE with values 0 and lam 1::

    R_t = r_t + gamma * R_next          over the valid tokens (masked ones carry R_next and output 0)

Unlike OpenRLHF's loop, masked gap tokens do not consume a discount step. Outputs fp32. These work on
``[B]`` scalars, a handful of tiny torch ops, so only ``reinforce_pp_returns`` (through ``gae``) has backends.
"""
from __future__ import annotations

import torch

from rlhf_fast._validation import check_choice, check_mask, check_tensor
from rlhf_fast.ops.gae import gae


def _grouped(scores, group_size, min_size: int = 1) -> torch.Tensor:
    check_tensor("scores", scores, floating=True, ndim=1)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < min_size:
        raise ValueError(f"group_size must be an integer >= {min_size}, got {group_size!r}")
    if scores.shape[0] % group_size:
        raise ValueError(f"group_size ({group_size}) must divide the number of scores ({scores.shape[0]})")
    return scores.float().view(-1, group_size)


def grpo_advantages(scores: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages ``[B]`` fp32: group-centred scores, scaled per ``scale`` (see the module docstring)."""
    s = _grouped(scores, group_size)
    check_choice("scale", scale, ("group", "batch", "none"))
    if group_size == 1:
        return s.view(-1)
    centred = s - s.mean(1, keepdim=True)
    if scale == "group":
        centred = centred / (s.std(1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (s.std() + eps)
    return centred.view(-1)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO advantages ``[B]`` fp32: each score minus the mean of the other G-1 in its group."""
    s = _grouped(scores, group_size, min_size=2)
    return (group_size / (group_size - 1) * (s - s.mean(1, keepdim=True))).view(-1)


def reinforce_pp_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                         backend: str = "auto") -> torch.Tensor:
    """Discounted return-to-go ``[B, T]`` fp32 of token rewards over the valid tokens: ``gae`` with V=0, lam=1."""
    check_tensor("rewards", rewards, floating=True, ndim=2)
    return gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0, backend=backend)[0]


def expand_to_tokens(adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Broadcast per-sequence ``adv[B]`` over the valid tokens of ``mask [B, T]``; 0 elsewhere; fp32."""
    check_tensor("adv", adv, floating=True, ndim=1)
    check_tensor("mask", mask, ndim=2)
    if mask.shape[0] != adv.shape[0]:
        raise ValueError(f"mask must have {adv.shape[0]} rows (one per adv entry), got shape {tuple(mask.shape)}")
    mask = check_mask("mask", mask, mask.shape)
    return torch.where(mask, adv.float()[:, None], 0.0)
