"""Supervised fine-tuning: maximise the log-likelihood of the completion tokens.

    loss = - sum_{b,t} m[b,t] * log pi(y[b,t] | y[b,<t]) / sum m          m: completion-token mask

The log-probs come from the fused lm_head path (``rlhf_fast.models.policy_logprobs``), the mean from
``rlhf_fast.ops.masked_mean``.
"""
from __future__ import annotations

import math

import torch

from rlhf_fast.data.collators import collate_sft
from rlhf_fast.models.packing import resolve_packing
from rlhf_fast.models.policy_logprobs import policy_logprobs
from rlhf_fast.ops import masked_mean
from rlhf_fast.trainer.base import Trainer, batch_indices, make_optimizer
from rlhf_fast.trainer.config import SFTConfig


class SFTTrainer(Trainer):
    name = "sft"
    progress_keys = ("loss",)

    def __init__(self, config: SFTConfig, model, tokenizer, records: list[dict]):
        super().__init__(config)
        if not records:
            raise ValueError("SFTTrainer needs at least one {'prompt', 'completion'} record")
        self.model, self.tokenizer, self.records = model, tokenizer, records
        self.pack = resolve_packing(config.pack_sequences, model)
        self.optimizer, self.scheduler = make_optimizer(model.parameters(), config.lr, config.warmup_steps)

    @property
    def total_steps(self) -> int:
        return self.config.max_steps or self.config.epochs * math.ceil(len(self.records) / self.config.batch_size)

    def checkpoint_models(self):
        return {"policy": self.model}

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def loss(self, batch: dict) -> torch.Tensor:
        logp = policy_logprobs(self.model, batch["input_ids"], batch["attention_mask"], batch["response_mask"],
                               pack=self.pack)
        return -masked_mean(logp, batch["response_mask"])

    def train_step(self, step: int) -> dict:
        cfg = self.config
        idx = batch_indices(len(self.records), cfg.batch_size, cfg.seed, step)
        batch = collate_sft([self.records[i] for i in idx], self.tokenizer)
        self.model.train()
        loss = self.loss(batch)
        self.check_finite(step, loss=loss)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        return {"loss": loss.item(), "grad_norm": grad_norm.item(), "lr": self.scheduler.get_last_lr()[0]}
