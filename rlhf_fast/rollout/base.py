"""RolloutEngine: the interface every rollout engine implements.

``generate`` samples ``n`` responses per prompt from π_τ, the model's next-token distribution after
temperature scaling (τ) and top-k / top-p filtering, and reports log π_τ of each sampled token.
With ``temperature=0`` decoding is greedy and log-probs are those of the unscaled model (τ = 1).

Sampling knobs follow vLLM: ``top_k=None`` (or any value <= 0) means no top-k filter, ``top_p=1``
means no nucleus filter. Stopping: a response ends at the tokenizer's EOS, at any of
``stop_token_ids`` (the stop token is kept in the response and in ``response_mask``), or after
``max_new_tokens`` tokens ("length", ``truncated=True``).

Prompts must fit the engine: ``len(prompt) + max_new_tokens <= max_model_len``. A longer prompt raises
ValueError naming its index, or, with ``truncate_prompts=True``, keeps only its last tokens.

``sync_weights(model)`` pushes the learner's weights into the engine and bumps ``weight_version``;
every batch records the version that produced it. ``sync_weights(model, verify=True)`` then checks the
engine against the learner (:meth:`RolloutEngine.verify_sync`): greedy responses to a few fixed prompts,
the engine's sampled-token log-probs against ``rlhf_fast.models.policy_logprobs`` (fp32), max |Δ| <= atol.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import torch

from rlhf_fast.rollout.batch import RolloutBatch, pack


@dataclass(frozen=True)
class SamplingConfig:
    """Validated sampling knobs, the engine-independent form of ``generate``'s arguments."""
    n: int
    temperature: float
    top_p: float
    top_k: int | None
    max_new_tokens: int
    stop_token_ids: tuple[int, ...]
    seed: int | None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Sample:
    """One generated response, before padding."""
    prompt_index: int
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length"


class RolloutEngine(ABC):
    def __init__(self, *, pad_token_id: int, eos_token_id: int | None, max_model_len: int | None,
                 truncate_prompts: bool = False):
        if not isinstance(pad_token_id, int) or pad_token_id < 0:
            raise ValueError(f"pad_token_id must be a non-negative int, got {pad_token_id!r}")
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.max_model_len = max_model_len
        self.truncate_prompts = truncate_prompts
        self._weight_version = 0
        self._closed = False

    # -- public API -------------------------------------------------------------------------------
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], n: int = 1, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int | None = None, max_new_tokens: int = 64,
                 stop_token_ids: Sequence[int] | None = None, seed: int | None = None) -> RolloutBatch:
        self._check_open()
        cfg = _sampling_config(n, temperature, top_p, top_k, max_new_tokens, stop_token_ids, seed)
        prompts = self._fit_prompts(prompt_token_ids, cfg.max_new_tokens)
        samples = self._generate(prompts, cfg)
        return collate(prompts, samples, self.pad_token_id, self._weight_version)

    def sync_weights(self, model: torch.nn.Module, verify: bool = False, verify_atol: float = 1e-3) -> None:
        """Push ``model``'s current weights into the engine; bumps ``weight_version``; ``verify``: then
        :meth:`verify_sync` (raises RuntimeError when the engine's log-probs are off by more than ``verify_atol``)."""
        self._check_open()
        self._sync_weights(model)
        self._weight_version += 1
        if verify:
            self.verify_sync(model, atol=verify_atol)

    def verify_sync(self, model: torch.nn.Module, atol: float = 1e-3, num_prompts: int = 4,
                    max_new_tokens: int = 4) -> float:
        """max |log π_engine(y_t) - log π_learner(y_t)| over greedy responses y to ``num_prompts`` fixed prompts
        (ids 3..vocab-1, lengths 1..8); RuntimeError naming the architecture, the worst token and the engine's
        own diagnosis when it exceeds ``atol``. atol=1e-3 suits fp32 engines (synced: ~1e-6); 16-bit ones need ~1e-1."""
        from rlhf_fast.models.geometry import model_geometry
        from rlhf_fast.rollout.mismatch import learner_logprobs
        if not isinstance(atol, (int, float)) or atol <= 0:
            raise ValueError(f"atol must be a positive number, got {atol!r}")
        vocab = model_geometry(model).vocab
        g = torch.Generator().manual_seed(1234)
        prompts = [torch.randint(3, vocab, (1 + 7 * i // max(1, num_prompts - 1),), generator=g).tolist()
                   for i in range(num_prompts)]
        batch = self.generate(prompts, temperature=0.0, max_new_tokens=max_new_tokens)
        delta = (learner_logprobs(model, batch) - batch.rollout_logprobs).abs() * batch.response_mask
        worst = float(delta.max())
        if not worst <= atol:   # NaN fails too
            row, col = divmod(int(delta.argmax()), delta.shape[1])
            arch = type(model).__name__
            tied = "tied" if model_geometry(model).tied else "untied"
            raise RuntimeError(
                f"weight sync verification failed for {arch} ({tied} embeddings): engine vs learner log-prob "
                f"max |Δ| = {worst:.3g} > atol {atol:g} (prompt {row}, response token {col}); "
                f"{self._diagnose_sync() or 'no engine-side diagnosis'}")
        return worst

    @property
    def weight_version(self) -> int:
        return self._weight_version

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- for subclasses ---------------------------------------------------------------------------
    @abstractmethod
    def _generate(self, prompts: list[list[int]], cfg: SamplingConfig) -> list[Sample]:
        """Samples for every prompt, a prompt's ``cfg.n`` samples consecutive, prompts in order."""

    @abstractmethod
    def _sync_weights(self, model: torch.nn.Module) -> None: ...

    def _diagnose_sync(self) -> str:
        """Engine-specific hint for a failed :meth:`verify_sync` (which engine tensors look stale)."""
        return ""

    def _close(self) -> None:
        pass

    # -- helpers ----------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")

    def _fit_prompts(self, prompts, max_new_tokens: int) -> list[list[int]]:
        if isinstance(prompts, torch.Tensor) or not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise TypeError("prompt_token_ids must be a non-empty list of lists of token ids")
        limit = None if self.max_model_len is None else self.max_model_len - max_new_tokens
        if limit is not None and limit < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt "
                             f"(max_model_len={self.max_model_len})")
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, torch.Tensor):
                p = p.tolist()
            if not isinstance(p, Sequence) or len(p) == 0 or not all(isinstance(t, int) and t >= 0 for t in p):
                raise TypeError(f"prompt_token_ids[{i}] must be a non-empty list of non-negative ints")
            if limit is not None and len(p) > limit:
                if not self.truncate_prompts:
                    raise ValueError(
                        f"prompt_token_ids[{i}] has {len(p)} tokens; with max_new_tokens={max_new_tokens} "
                        f"and max_model_len={self.max_model_len} at most {limit} fit "
                        f"(pass truncate_prompts=True to keep the last {limit} tokens)")
                p = p[len(p) - limit:]
            out.append(list(p))
        return out


def _sampling_config(n, temperature, top_p, top_k, max_new_tokens, stop_token_ids, seed) -> SamplingConfig:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if top_k is not None and not isinstance(top_k, int):
        raise ValueError(f"top_k must be an int or None, got {top_k!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    stops = tuple(int(t) for t in (stop_token_ids or ()))
    return SamplingConfig(n=n, temperature=float(temperature), top_p=float(top_p),
                          top_k=top_k if top_k is not None and top_k > 0 else None,
                          max_new_tokens=max_new_tokens, stop_token_ids=stops, seed=seed)


def collate(prompts: list[list[int]], samples: list[Sample], pad_token_id: int, weight_version: int) -> RolloutBatch:
    """Pad samples into a RolloutBatch: prompts left-padded, responses right-padded."""
    prompt_ids, response_ids, attention_mask, response_mask = pack(
        [prompts[s.prompt_index] for s in samples], [s.token_ids for s in samples], pad_token_id)
    logprobs = torch.zeros(response_ids.shape, dtype=torch.float32)
    for b, s in enumerate(samples):
        logprobs[b, :len(s.logprobs)] = torch.tensor(s.logprobs, dtype=torch.float32)
    finish = [s.finish_reason for s in samples]
    return RolloutBatch(
        prompt_ids=prompt_ids, response_ids=response_ids, attention_mask=attention_mask,
        response_mask=response_mask, rollout_logprobs=logprobs, finish_reasons=finish,
        truncated=torch.tensor([f == "length" for f in finish], dtype=torch.bool),
        weight_version=weight_version,
        prompt_index=torch.tensor([s.prompt_index for s in samples], dtype=torch.long))
