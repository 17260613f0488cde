"""Drop-ins for TRL: ``selective_log_softmax``, ``selective_log_softmax_and_entropy`` and ``entropy_from_logits``
(``trl.trainer.utils``, TRL 1.16), and ``masked_whiten`` (``trl.experimental.ppo.ppo_trainer``, last shipped in
TRL 1.10; ``trl.trainer.utils`` before that).

Same signatures and return structure; outputs fp32 (TRL returns the logits' dtype). The log-prob and
entropy functions stream each row of logits once (``rlhf_fast.ops.logprob``: native C++ on CPU, Triton on
GPU) with a fused backward, instead of TRL's per-row ``log_softmax`` loop on CPU. ``chunk_size`` is accepted
and ignored: nothing of size [chunk, V] is materialised.
"""
from __future__ import annotations

import torch

from rlhf_fast._validation import check_tensor
from rlhf_fast.compat._common import whiten_everywhere
from rlhf_fast.ops.logprob import logprobs_from_logits

__all__ = ["selective_log_softmax", "selective_log_softmax_and_entropy", "entropy_from_logits", "masked_whiten"]

_IGNORE = -100


def _labels(index: torch.Tensor, row_mask: torch.Tensor | None) -> torch.Tensor:
    """Rows with ``row_mask == 0`` become ignored (log-prob and entropy 0, no gradient), as TRL's masked_fill."""
    check_tensor("index", index)
    return index if row_mask is None else torch.where(row_mask == 0, _IGNORE, index)


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ValueError("temperature must be positive")


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, temperature: float = 1.0,
                          row_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``log_softmax(logits / temperature)`` gathered at ``index``: shape ``(...)`` for ``index`` of shape
    ``(...)`` (one token per row), or ``(..., K)`` for ``index`` of shape ``(..., K)`` (K tokens per row).

    For K tokens the kernel runs once, on the first: ``logp_k = s_k - s_0 + logp_0`` with ``s = logits / temperature``
    (the log-normaliser cancels), so nothing of size [..., V] is written.
    """
    _check_temperature(temperature)
    if index.dim() == logits.dim() - 1:
        return logprobs_from_logits(logits, _labels(index, row_mask), temperature=temperature, ignore_index=_IGNORE)
    first = index[..., :1]
    logp0 = logprobs_from_logits(logits, first.squeeze(-1), temperature=temperature, ignore_index=_IGNORE)
    s = logits.gather(-1, index).float() / temperature
    logp = s - s[..., :1] + logp0.unsqueeze(-1)
    return logp if row_mask is None else logp.masked_fill(row_mask == 0, 0.0)


def selective_log_softmax_and_entropy(logits: torch.Tensor, index: torch.Tensor, entropy_requires_grad: bool = True,
                                      temperature: float = 1.0, row_mask: torch.Tensor | None = None
                                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log-prob at index, entropy)`` of ``softmax(logits / temperature)`` in one pass; rows with
    ``row_mask == 0`` give zeros."""
    _check_temperature(temperature)
    logp, entropy = logprobs_from_logits(logits, _labels(index, row_mask), temperature=temperature,
                                         ignore_index=_IGNORE, return_entropy=True)
    return logp, entropy if entropy_requires_grad else entropy.detach()


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """Shannon entropy (nats) of ``softmax(logits)`` along the last axis: shape ``logits.shape[:-1]``."""
    check_tensor("logits", logits, floating=True)
    index = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return logprobs_from_logits(logits, index, return_entropy=True)[1]


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``(values - mean) * rsqrt(var + 1e-8)`` at every position (``+ mean`` if not ``shift_mean``), with the
    global mean and unbiased variance of the entries where ``mask`` is set."""
    return whiten_everywhere(values, mask, shift_mean)
