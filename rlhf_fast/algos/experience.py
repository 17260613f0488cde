"""Experience: one iteration's rollouts, scored, shaped and with advantages — built by a pure function.

From a rollout batch (``[B, P + R]`` sequences, ``[B, R]`` response tensors), the scoring forwards and the
sequence scores ``s [B]``::

    rewards, kl = ops.shape_rewards(s, old_logp, ref_logp, mask, kl_coef)   (no KL term without ref_logp)
    A, R        = ADVANTAGE_ESTIMATORS[estimator](rewards, mask, values, params)

``old_logp=None`` is the single on-policy pass (one epoch, one minibatch, no reference): no optimizer step comes
before any micro-batch's forward, so the update's own detached log-probs are the old ones (ratio 1 with its
gradient) and the scoring forward is skipped. The experience is frozen: the update reads it, never writes it.
"""
from __future__ import annotations

import dataclasses

import torch

from rlhf_fast import ops
from rlhf_fast.algos.advantages import AdvantageParams, get_estimator
from rlhf_fast.rollout import RolloutBatch


@dataclasses.dataclass(frozen=True)
class Experience:
    """``[B, L]`` sequence tensors, ``[B, R]`` response tensors (R = L - P)."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask_full: torch.Tensor   # bool [B, L]: the response tokens in the sequence layout
    mask: torch.Tensor                 # bool [B, R]
    prompt_len: int
    old_logp: torch.Tensor | None      # None: single on-policy pass, the update's own forward is used
    rollout_logp: torch.Tensor
    advantages: torch.Tensor
    values: torch.Tensor | None
    returns: torch.Tensor | None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, idx: torch.Tensor) -> "Experience":
        """The experience of rows ``idx`` (a new object; tensors indexed, nothing shared is written)."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})

    def trim(self) -> "Experience":
        """The same rows without the columns no row uses: the prompt's all-padding leading columns and the
        response's all-padding trailing ones. Exact: positions count real tokens, attention is masked and causal,
        and masked response positions carry no weight. Response tensors ``[b, R']``, R' the longest response."""
        lead = int(self.prompt_len - self.attention_mask[:, :self.prompt_len].sum(1).max())
        width = max(int(self.mask.sum(1).max()), 1)
        P = self.prompt_len
        seq = ("input_ids", "attention_mask", "response_mask_full")
        cut = {f.name: (v[:, lead:P + width] if f.name in seq else v[:, :width])
               for f in dataclasses.fields(self) if isinstance(v := getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, prompt_len=P - lead, **cut)


def make_experience(batch: RolloutBatch, scores: torch.Tensor, old_logp: torch.Tensor | None,
                    ref_logp: torch.Tensor | None, values: torch.Tensor | None, *, estimator: str,
                    params: AdvantageParams, kl_coef: float, kl_estimator: str = "k1",
                    reward_clip: float | None = None) -> tuple[Experience, dict]:
    """``(experience, stats)``, stats the score/KL/length/advantage summaries as Python floats (``kl``: the mean
    over rows of the per-sequence KL sum). ``ref_logp=None``: no KL term."""
    mask = batch.response_mask
    no_kl = torch.zeros_like(batch.rollout_logprobs)
    rewards, kl = ops.shape_rewards(scores, no_kl if ref_logp is None else old_logp,
                                    no_kl if ref_logp is None else ref_logp, mask, kl_coef,
                                    estimator=kl_estimator, reward_clip=reward_clip)
    advantages, returns = get_estimator(estimator).fn(rewards, mask, values, params)
    exp = Experience(batch.input_ids, batch.attention_mask, batch.response_mask_full, mask, batch.prompt_length, old_logp,
                     batch.rollout_logprobs, advantages, values, returns)
    stats = {"score": scores.mean().item(), "score_std": scores.std().item() if len(scores) > 1 else 0.0,
             "kl": ops.masked_sum(kl, mask, dim=1).mean().item(), "kl_coef": float(kl_coef),
             "response_length": mask.sum(1).float().mean().item(),
             "truncated_frac": batch.truncated.float().mean().item(),
             "advantage_mean": ops.masked_mean(advantages, mask).item()}
    if values is not None:
        stats["value_mean"] = ops.masked_mean(values, mask).item()
    return exp, stats
