"""Methods mixed into every vLLM worker (``LLM(worker_extension_cls=...)``), called through
``llm.collective_rpc``. They run inside the worker, next to ``self.model_runner``.

``reload_weights`` (vLLM's in-place reload) is used rather than ``model.load_weights``: on the
CPU backend linear weights are repacked after loading and the checkpoint-format parameters are
emptied, so only the reload path (which re-runs the post-load processing) writes them correctly.
It processes a layer once all of its checkpoint tensors have arrived in one call, so a bucket must
hold whole layers (see ``weight_sync.plan_buckets``).
"""
from __future__ import annotations

import logging
import os
from typing import Iterable

import torch

from rlhf_fast.rollout import vllm_compat as compat


class _QuietRotaryReload(logging.Filter):
    """Drops the warning ``reload_weights`` logs for the rotary embedding on every sync: its cos/sin cache is
    a buffer that no checkpoint holds, and vLLM puts it back unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "RotaryEmbedding: Failed to load weights"


logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_QuietRotaryReload())


class WorkerExtension:
    def rlhf_fast_update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load checkpoint-format (HF-named) tensors of whole layers: one bucket, or (an in-process worker) an
        iterator over a whole sync's buckets that waits for each one as it is read."""
        compat.reload_weights(self.model_runner, named_tensors)

    def rlhf_fast_finish_sync(self) -> list[str]:
        """After the last bucket: re-pack modules that share a weight (tied lm_head; see
        ``vllm_compat.refresh_tied_heads``); returns their names."""
        return compat.refresh_tied_heads(compat.runner_model(self.model_runner))

    def rlhf_fast_stale_gemms(self) -> dict[str, float]:
        """Per readable packed module, max |packed GEMM - weight GEMM| on a random input (sync diagnosis)."""
        return compat.stale_packed_gemms(compat.runner_model(self.model_runner))

    def rlhf_fast_pid(self) -> int:
        """The worker's process id (tests kill it to check that a dead engine is reported)."""
        return os.getpid()

    def rlhf_fast_checksum(self, names: list[str]) -> list[float]:
        """Sum of each named vLLM parameter, to check that a sync reached the worker."""
        params = dict(compat.runner_model(self.model_runner).named_parameters())
        return [params[n].detach().float().sum().item() for n in names]
