"""Advantage estimators by name: ``ADVANTAGE_ESTIMATORS[name].fn(rewards, mask, values, params) -> (A, R)``.

``rewards`` ``[B, T]`` shaped token rewards, ``mask`` bool ``[B, T]``, ``values`` ``[B, T]`` (None without a
critic); ``params`` an :class:`AdvantageParams`. ``A`` ``[B, T]`` fp32 advantages (0 where masked), ``R`` the
critic's targets (None for the critic-free estimators)::

    gae          A, R = ops.gae(rewards, V, mask, gamma, lam);  A <- whiten(A)           needs a critic
    grpo         G_b = sum_t rewards[b, t];  A = ops.grpo_advantages(G, group_size) on every token of row b
    rloo         as grpo with ops.rloo_advantages (leave-one-out baseline)               group_size >= 2
    reinforce++  A = whiten(ops.reinforce_pp_returns(rewards, mask, gamma))

``whiten`` (``ops.masked_whiten``, global statistics) applies to gae and reinforce++ when ``params.whiten``.
A new estimator is one decorated function: ``@register_advantage("name", needs_critic=..., min_group_size=...)``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from rlhf_fast import ops

AdvantageFn = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


@dataclasses.dataclass(frozen=True)
class AdvantageParams:
    gamma: float = 1.0
    lam: float = 0.95
    group_size: int = 1          # consecutive rows sampled from one prompt
    whiten: bool = True


@dataclasses.dataclass(frozen=True)
class AdvantageEstimator:
    fn: AdvantageFn
    needs_critic: bool           # consumes values and returns critic targets
    min_group_size: int          # samples per prompt it needs


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}


def register_advantage(name: str, needs_critic: bool = False, min_group_size: int = 1):
    """Decorator adding ``fn(rewards, mask, values, params) -> (advantages, returns | None)`` as ``name``."""
    def deco(fn: AdvantageFn) -> AdvantageFn:
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ADVANTAGE_ESTIMATORS[name] = AdvantageEstimator(fn, needs_critic, min_group_size)
        return fn
    return deco


def get_estimator(name: str) -> AdvantageEstimator:
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"estimator must be one of {sorted(ADVANTAGE_ESTIMATORS)}, got {name!r}")
    return ADVANTAGE_ESTIMATORS[name]


def _whiten(adv: torch.Tensor, mask: torch.Tensor, params: AdvantageParams) -> torch.Tensor:
    return ops.masked_whiten(adv, mask) if params.whiten else adv


@register_advantage("gae", needs_critic=True)
def gae_advantages(rewards, mask, values, params):
    adv, returns = ops.gae(rewards, values, mask, params.gamma, params.lam)
    return _whiten(adv, mask, params), returns


@register_advantage("grpo", min_group_size=2)
def grpo_advantages(rewards, mask, values, params):
    adv = ops.grpo_advantages(ops.masked_sum(rewards, mask, dim=1), params.group_size)
    return ops.expand_to_tokens(adv, mask), None


@register_advantage("rloo", min_group_size=2)
def rloo_advantages(rewards, mask, values, params):
    adv = ops.rloo_advantages(ops.masked_sum(rewards, mask, dim=1), params.group_size)
    return ops.expand_to_tokens(adv, mask), None


@register_advantage("reinforce++")
def reinforce_pp_advantages(rewards, mask, values, params):
    return _whiten(ops.reinforce_pp_returns(rewards, mask, params.gamma), mask, params), None
