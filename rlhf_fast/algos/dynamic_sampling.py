"""Dynamic sampling (DAPO, Yu et al. 2025): train the group estimators only on groups whose rewards differ.

A rollout batch's ``B = G * n`` rows are ``G`` groups of ``n = group_size`` consecutive rows (one prompt's
samples, ``prompt_index`` ``g`` on rows ``g*n .. g*n + n - 1``). With a group's scores ``s_g [n]``::

    degenerate(g)  <=>  max(s_g) - min(s_g) <= eps       (eps = 0: all equal; the group's grpo / rloo
                                                           advantages are 0 but for the KL penalty's share)

``fill_groups`` keeps the non-degenerate groups of round 0 (the step's usual prompts) and, while fewer than
``batch_size`` are kept, runs extra rounds on prompts not yet drawn this step (at most ``max_rounds``)::

    round r >= 1:  prompts = the first min(batch_size, unused) of a permutation of the prompts not drawn yet
                   this step, seeded by (seed, r): a full round each time, as verl's (fewer, larger rounds)

The kept groups are concatenated in round order and the first ``batch_size`` taken (extra ones are cut).
Fill policy: when the cap is hit or the prompts run out first, the batch has fewer groups (it is trained as it
is); when no group is kept at all, there is no batch (the caller skips the update). Stats::

    dynamic_sampling_dropped_frac  degenerate groups / generated groups (over all rounds of the step)
    dynamic_sampling_rounds        extra rounds run (0 .. max_rounds)
    dynamic_sampling_groups        groups in the returned batch (0 .. batch_size)
    dynamic_sampling_score         mean score over every generated row (the policy's, before filtering)
"""
from __future__ import annotations

from dataclasses import fields, replace
from typing import Callable

import torch

from rlhf_fast.ops.advantages import _grouped
from rlhf_fast.rollout.batch import RolloutBatch, pack

Rollout = Callable[[list[int], int], tuple[RolloutBatch, torch.Tensor]]

__all__ = ["zero_variance_groups", "group_rows", "select_groups", "concat_batches", "fill_groups"]


def zero_variance_groups(scores: torch.Tensor, group_size: int, eps: float = 0.0) -> torch.Tensor:
    """bool ``[B / n]``: ``max(s_g) - min(s_g) <= eps`` per group of ``n = group_size`` consecutive scores."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    s = _grouped(scores, group_size)
    return (s.amax(1) - s.amin(1)) <= eps


def group_rows(groups: torch.Tensor, group_size: int) -> torch.Tensor:
    """int64 ``[k * n]``: the rows ``g*n .. g*n + n - 1`` of each group ``g`` in ``groups [k]``, in that order."""
    groups = torch.as_tensor(groups, dtype=torch.long).reshape(-1)
    return (groups[:, None] * group_size + torch.arange(group_size)).reshape(-1)


def _check_grouped(batch: RolloutBatch, group_size: int) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an integer >= 1, got {group_size!r}")
    if len(batch) % group_size:
        raise ValueError(f"group_size ({group_size}) must divide the batch's rows ({len(batch)})")
    return len(batch) // group_size


def select_groups(batch: RolloutBatch, groups: torch.Tensor, group_size: int) -> RolloutBatch:
    """The rows of groups ``groups [k]`` (indices, in that order), ``prompt_index`` renumbered ``0 .. k-1``;
    the padding is left as it is (``concat_batches`` re-packs)."""
    n_groups = _check_grouped(batch, group_size)
    groups = torch.as_tensor(groups, dtype=torch.long).reshape(-1)
    if len(groups) and (groups.min() < 0 or groups.max() >= n_groups):
        raise ValueError(f"groups must be in [0, {n_groups}), got {groups.tolist()}")
    rows = group_rows(groups, group_size)
    picked = {f.name: getattr(batch, f.name)[rows] for f in fields(batch)
              if isinstance(getattr(batch, f.name), torch.Tensor)}
    picked["finish_reasons"] = [batch.finish_reasons[i] for i in rows.tolist()]
    picked["prompt_index"] = torch.arange(len(groups)).repeat_interleave(group_size)
    return replace(batch, **picked)


def concat_batches(batches: list[RolloutBatch], pad_id: int) -> RolloutBatch:
    """One batch of the rows of ``batches`` in order, re-packed by :func:`rlhf_fast.rollout.batch.pack` to the
    longest prompt P and response R among them; ``rollout_logprobs`` scattered onto the new response mask
    (each row's response tokens lead its row in both layouts), ``prompt_index`` offset by the prompts of the
    batches before (``max + 1`` of each). All batches must come from one weight version; empty ones are skipped."""
    batches = [b for b in batches if len(b)]
    if not batches:
        raise ValueError("concat_batches needs at least one row")
    versions = sorted({b.weight_version for b in batches})
    if len(versions) > 1:
        raise ValueError(f"batches must share one weight_version, got {versions}")
    prompts, responses, logprobs, prompt_index, offset = [], [], [], [], 0
    for b in batches:
        prompt_mask = b.attention_mask[:, :b.prompt_length]
        prompts += [ids[m].tolist() for ids, m in zip(b.prompt_ids, prompt_mask)]
        responses += [ids[m].tolist() for ids, m in zip(b.response_ids, b.response_mask)]
        logprobs.append(b.rollout_logprobs[b.response_mask])
        prompt_index.append(b.prompt_index + offset)
        offset += int(b.prompt_index.max()) + 1
    prompt_ids, response_ids, attention_mask, response_mask = pack(prompts, responses, pad_id)
    rollout_logprobs = torch.zeros(response_ids.shape, dtype=torch.float32).masked_scatter_(
        response_mask, torch.cat(logprobs).float())
    return RolloutBatch(prompt_ids=prompt_ids, response_ids=response_ids, attention_mask=attention_mask,
                        response_mask=response_mask, rollout_logprobs=rollout_logprobs,
                        finish_reasons=[f for b in batches for f in b.finish_reasons],
                        truncated=torch.cat([b.truncated for b in batches]), weight_version=versions[0],
                        prompt_index=torch.cat(prompt_index))


def fill_groups(rollout: Rollout, first: list[int], n_prompts: int, *, batch_size: int, group_size: int,
                max_rounds: int, pad_id: int, seed: int, eps: float = 0.0
                ) -> tuple[RolloutBatch | None, torch.Tensor | None, list[int], dict]:
    """The loop in the module docstring. ``rollout(prompt_indices, round) -> (batch, scores [B])`` generates
    ``group_size`` samples of each prompt (``prompt_index`` ``j`` for ``prompt_indices[j]``) and scores them;
    ``first``: round 0's prompt indices, drawn from ``range(n_prompts)``. Returns ``(batch, scores, prompts,
    stats)``: the kept batch (None when nothing is kept), its scores, the prompt index of each of its groups
    (``prompts[batch.prompt_index[i]]`` is row i's), and the stats above."""
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 0:
        raise ValueError(f"max_rounds must be an integer >= 0, got {max_rounds!r}")
    kept_batches, kept_scores, kept_prompts, all_scores = [], [], [], []
    unused = sorted(set(range(n_prompts)) - set(first))
    idx, generated, varied, rounds = list(first), 0, 0, 0
    while True:
        batch, scores = rollout(idx, rounds)
        _check_grouped(batch, group_size)
        keep = (~zero_variance_groups(scores, group_size, eps)).nonzero().view(-1)
        generated, varied = generated + len(batch) // group_size, varied + len(keep)
        keep = keep[:batch_size - len(kept_prompts)]          # the groups beyond batch_size are cut
        kept_batches.append(select_groups(batch, keep, group_size))
        kept_scores.append(scores[group_rows(keep, group_size)])
        kept_prompts += [idx[g] for g in keep.tolist()]
        all_scores.append(scores)
        if len(kept_prompts) == batch_size or rounds == max_rounds or not unused:
            break
        rounds += 1
        g = torch.Generator().manual_seed(seed + rounds)
        idx = [unused[i] for i in torch.randperm(len(unused), generator=g)[:batch_size].tolist()]
        unused = sorted(set(unused) - set(idx))
    stats = {"dynamic_sampling_dropped_frac": 1.0 - varied / generated,
             "dynamic_sampling_rounds": rounds, "dynamic_sampling_groups": len(kept_prompts),
             "dynamic_sampling_score": torch.cat(all_scores).float().mean().item()}
    if not kept_prompts:
        return None, None, [], stats
    return concat_batches(kept_batches, pad_id), torch.cat(kept_scores), kept_prompts, stats
