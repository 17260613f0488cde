"""Reward-model training from comparisons.

Best-of-K (Ziegler et al. 2019: a labeler picks the best of K samples; softmax / Luce choice loss)::

    loss = - log softmax_k( r(x, y_k) )[best]

Pairwise (Bradley-Terry; K = 2 with the chosen completion first) with an optional margin m (Llama-2 style)::

    loss = - log sigmoid( r(x, y_c) - r(x, y_r) - margin_scale * m )

which equals the K = 2 softmax loss when m = 0. Batches are formed from records with the same K.
Accuracy: the preferred completion has the strictly highest reward.
"""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from rlhf_fast.data.collators import as_best_of_k, collate_comparisons
from rlhf_fast.models.reward_model import RewardModel
from rlhf_fast.trainer.base import Trainer, make_optimizer
from rlhf_fast.trainer.config import RewardConfig


def comparison_loss(rewards: torch.Tensor, best: torch.Tensor, margin: torch.Tensor,
                    margin_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``rewards`` [B, K] -> (mean loss, per-record correctness [B] bool). See the module docstring."""
    if rewards.shape[1] == 2 and bool((best == 0).all()) and bool(margin.any()):
        loss = -F.logsigmoid(rewards[:, 0] - rewards[:, 1] - margin_scale * margin).mean()
    else:
        loss = F.cross_entropy(rewards, best)
    picked = rewards.gather(1, best[:, None])
    others = rewards.masked_fill(F.one_hot(best, rewards.shape[1]).bool(), -math.inf)
    correct = (picked.squeeze(1) > others.amax(1))
    return loss, correct


def group_batches(records: list[dict], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches of indices, each with one K (number of completions), shuffled by ``(seed, epoch)``."""
    by_k: dict[int, list[int]] = {}
    for i, r in enumerate(records):
        by_k.setdefault(len(as_best_of_k(r)["completions"]), []).append(i)
    rng = random.Random(seed * 1_000_003 + epoch)
    batches = []
    for k in sorted(by_k):
        idx = by_k[k]
        rng.shuffle(idx)
        batches += [idx[j:j + batch_size] for j in range(0, len(idx), batch_size)]
    rng.shuffle(batches)
    return batches


def comparison_step(model: RewardModel, optimizer, tokenizer, records: list[dict], max_grad_norm: float,
                    margin_scale: float = 1.0, check_finite=None) -> tuple[dict, torch.Tensor]:
    """One optimizer step of the comparison loss on ``records`` (one K). Returns (metrics, rewards [B, K]).
    ``check_finite(loss=...)`` is called before the update (it raises on NaN/inf)."""
    batch = collate_comparisons(records, tokenizer)
    model.train()
    rewards = model.score(batch["input_ids"], batch["attention_mask"]).view(len(records), batch["k"])
    loss, correct = comparison_loss(rewards, batch["best"], batch["margin"], margin_scale)
    if check_finite is not None:
        check_finite(loss=loss)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    return {"loss": loss.item(), "accuracy": correct.float().mean().item(), "grad_norm": grad_norm.item()}, rewards


class RewardTrainer(Trainer):
    name = "reward"
    progress_keys = ("loss", "accuracy")

    def __init__(self, config: RewardConfig, model: RewardModel, tokenizer, records: list[dict],
                 eval_records: list[dict] | None = None):
        super().__init__(config)
        if not records:
            raise ValueError("RewardTrainer needs at least one comparison record")
        self.model, self.tokenizer = model, tokenizer
        self.records = records
        self.eval_records = eval_records or []
        self.optimizer, self.scheduler = make_optimizer(model.parameters(), config.lr, config.warmup_steps)
        self._epoch_batches: dict[int, list[list[int]]] = {}

    def _batches(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epoch_batches:
            self._epoch_batches = {epoch: group_batches(self.records, self.config.batch_size, self.config.seed, epoch)}
        return self._epoch_batches[epoch]

    @property
    def steps_per_epoch(self) -> int:
        return len(self._batches(0))

    @property
    def total_steps(self) -> int:
        return self.config.max_steps or self.config.epochs * self.steps_per_epoch

    def checkpoint_models(self):
        return {"reward_model": self.model}

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


    def train_step(self, step: int) -> dict:
        epoch, i = divmod(step, self.steps_per_epoch)
        recs = [self.records[j] for j in self._batches(epoch)[i]]
        rec, rewards = comparison_step(self.model, self.optimizer, self.tokenizer, recs, self.config.max_grad_norm,
                                       self.config.margin_scale, lambda **v: self.check_finite(step, **v))
        self.scheduler.step()
        rec.update(reward_mean=rewards.mean().item(), reward_std=rewards.std().item() if rewards.numel() > 1 else 0.0)
        if self.eval_records and (step + 1 == self.total_steps):
            rec.update({f"eval_{k}": v for k, v in self.evaluate().items()})
        return rec

    @torch.no_grad()
    def evaluate(self, records: list[dict] | None = None) -> dict:
        """Loss and accuracy on ``records`` (default: the held-out set)."""
        records = records if records is not None else self.eval_records
        self.model.eval()
        losses, correct = [], []
        for idx in group_batches(records, self.config.batch_size, 0, 0):
            batch = collate_comparisons([records[j] for j in idx], self.tokenizer)
            rewards = self.model.score(batch["input_ids"], batch["attention_mask"]).view(len(idx), batch["k"])
            loss, ok = comparison_loss(rewards, batch["best"], batch["margin"], self.config.margin_scale)
            losses.append(loss.item() * len(idx))
            correct.append(ok)
        self.model.train()
        ok = torch.cat(correct)
        return {"loss": sum(losses) / len(ok), "accuracy": ok.float().mean().item(), "count": len(ok)}
