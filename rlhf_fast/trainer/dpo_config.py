"""Config of ``rlhf-fast dpo``: :class:`DPOConfig`, in the pattern of :mod:`rlhf_fast.trainer.config` (fields
declared with ``key``, validated when built; the ``lora`` and ``columns`` sections every trainer shares)."""
from __future__ import annotations

import dataclasses

from rlhf_fast.trainer.config import (ConfigError, DataColumns, LoraSection, RunConfig, columns_key, key,
                                     lora_key, pack_key)

__all__ = ["DPOConfig", "DataColumns", "LoraSection"]


def _preference_losses():
    from rlhf_fast.ops.preference import LOSS_TYPES
    return LOSS_TYPES


@dataclasses.dataclass
class DPOConfig(RunConfig):
    """Direct preference optimisation (DPO / cDPO, IPO, SimPO, hinge) from pairwise comparisons."""
    model: str = key("", "local HF causal-LM directory: the SFT policy, also the reference")
    data: str = key("", "comparisons: JSONL {prompt, chosen, rejected} (best-of-K lines give K-1 pairs), a "
                    "saved HF dataset directory or parquet (alias --comparisons)")
    epochs: int = key(1, "passes over the data", ge=1)
    max_steps: int = key(0, "stop after N steps (0: epochs x batches)", ge=0)
    lr: float = key(1e-6, "learning rate (AdamW)", gt=0)
    batch_size: int = key(16, "pairs per optimizer step", ge=1)
    micro_batch_size: int = key(0, "pairs per forward/backward (0: the whole batch)", ge=0)
    loss_type: str = key("sigmoid", "sigmoid (DPO), hinge, ipo or simpo (no reference)",
                         choices=_preference_losses)
    beta: float = key(0.1, "temperature beta (IPO: tau)", gt=0)
    label_smoothing: float = key(0.0, "cDPO label smoothing (sigmoid, simpo)", ge=0, lt=0.5)
    simpo_gamma: float = key(0.5, "SimPO target margin gamma", ge=0)
    pack_sequences: str = pack_key()
    lora: LoraSection = lora_key()
    columns: DataColumns = columns_key()

    def check(self) -> None:
        if self.label_smoothing and self.loss_type not in ("sigmoid", "simpo"):
            raise ConfigError(f"applies to loss_type sigmoid or simpo, not {self.loss_type!r}", "label_smoothing")
        if self.micro_batch_size > self.batch_size:
            raise ConfigError(f"must be <= batch_size ({self.batch_size}), got {self.micro_batch_size}",
                              "micro_batch_size")
