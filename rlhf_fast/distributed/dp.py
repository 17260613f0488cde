"""Data parallelism over W learner ranks: row shards, all-gathers, and the global minibatch totals.

Scoring: rank r runs the forwards on its rows ``shard_rows(B, W, r)``; the per-token outputs (``[B, R]`` each,
small next to activations) are all-gathered, and every rank builds the same whole-batch experience
(``rlhf_fast.algos.make_experience``: GRPO groups and advantage whitening see the whole batch, never a shard).

Update: a minibatch M is split into disjoint shards M_r. ``rlhf_fast.algos.ppo_objective`` normalises a piece of a
minibatch by the minibatch's totals ``(N, S)`` (valid tokens, non-empty rows), so with the *global* totals::

    N = sum_r N_r,  S = sum_r S_r                    (all_reduce of the shards' totals, before the first forward)
    L = sum_r L_r(M_r; N, S)                          = the one-process minibatch loss, every aggregation mode

FSDP2 (like DDP) averages the ranks' gradients, so each rank backpropagates ``W * L_r``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from rlhf_fast.ops.agg import batch_totals


def _world(group=None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def shard_rows(n: int, world: int, rank: int) -> torch.Tensor:
    """Row indices of ``rank``'s shard of ``n`` rows (contiguous, sizes differ by at most one)."""
    return torch.tensor_split(torch.arange(n), world)[rank]


def all_gather_rows(local: torch.Tensor, n: int, group=None) -> torch.Tensor:
    """Concatenate every rank's ``[n_r, ...]`` shard (from :func:`shard_rows`) into ``[n, ...]`` on all ranks."""
    world = _world(group)
    if world == 1:
        return local
    sizes = [len(s) for s in torch.tensor_split(torch.arange(n), world)]
    padded = local.new_zeros((max(sizes), *local.shape[1:]))
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def global_totals(mask: torch.Tensor, group=None) -> tuple[int, int]:
    """``(N, S)`` of the whole minibatch from this rank's shard ``mask`` ``[b, T]`` (bool)."""
    totals = torch.tensor(batch_totals(mask), dtype=torch.int64, device=mask.device)
    if _world(group) > 1:
        dist.all_reduce(totals, group=group)
    return int(totals[0]), int(totals[1])
