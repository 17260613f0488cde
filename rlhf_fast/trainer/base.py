"""The loop every trainer shares: resume from the latest checkpoint, step, log, checkpoint, stop on NaN.

A trainer subclasses :class:`Trainer` and defines ``total_steps``, ``train_step(step) -> metrics``,
``checkpoint_models()`` and ``state_dict()/load_state_dict()`` (optimizers, schedulers, controllers).
Everything a step consumes (data order, sampling seeds) is a function of ``(config.seed, step)``, so restoring
weights, optimizer state and the step count continues a run exactly.
"""
from __future__ import annotations

import math
import os
import time

import torch
from tqdm.auto import tqdm

from rlhf_fast.trainer.checkpoint import latest_checkpoint, load_checkpoint, newest_complete_checkpoint, save_checkpoint
from rlhf_fast.trainer.metrics import MetricsLogger


class NonFiniteLossError(RuntimeError):
    """A loss or reward became NaN/inf; the message names the step, the quantity and the last good checkpoint."""


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Indices of batch ``step`` when ``n`` records are reshuffled every epoch (a permutation seeded by
    ``(seed, epoch)``) and cut into ``ceil(n / batch_size)`` batches; the last batch of an epoch may be short."""
    per_epoch = math.ceil(n / batch_size)
    epoch, i = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[i * batch_size:(i + 1) * batch_size].tolist()


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """A sampling seed derived from ``(seed, step)`` (so resumed rollouts are identical)."""
    return (seed * 1_000_003 + step * 7_919 + salt * 104_729) % (2**31 - 1)


def make_optimizer(params, lr: float, warmup_steps: int = 0):
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(warmup_steps, 1)))
    return opt, sched


class Trainer:
    name = "train"
    progress_keys: tuple[str, ...] = ("loss",)

    def __init__(self, config):
        self.config = config
        self.out_dir = config.out_dir
        self.metrics: MetricsLogger | None = None
        self.step = 0

    # -- to implement -----------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        raise NotImplementedError

    def train_step(self, step: int) -> dict:
        raise NotImplementedError

    def checkpoint_models(self) -> dict[str, torch.nn.Module]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def on_resume(self) -> None:
        """Hook after a checkpoint was loaded (e.g. push the weights into a rollout engine)."""

    # -- shared -----------------------------------------------------------------------------------
    def check_finite(self, step: int, **values) -> None:
        values = {k: v.item() if isinstance(v, torch.Tensor) else float(v) for k, v in values.items()}
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad:
            last = latest_checkpoint(self.out_dir)
            raise NonFiniteLossError(
                f"[{self.name}] non-finite value at step {step + 1}: {bad} (all values: {values}). The run stopped before the optimizer step; "
                f"last good checkpoint: {last or 'none (nothing saved yet)'}. Lower the learning rate, "
                f"check the data/rewards, or resume from that checkpoint with --resume.")

    def save(self, step: int) -> str:
        return save_checkpoint(self.out_dir, step, self.checkpoint_models(), self.state_dict(),
                               keep_last=self.config.keep_last)

    def resume(self, path: str | None = None) -> int:
        """Load the checkpoint ``path`` (already verified), or else the newest complete one if any (newer
        incomplete ones are skipped, said on stderr); returns the step to continue from."""
        path = path or newest_complete_checkpoint(self.out_dir)
        if path is None:
            return 0
        state = load_checkpoint(path, self.checkpoint_models(), verify=False)   # verified by now
        self.load_state_dict(state)
        self.step = int(state["step"])
        self.on_resume()
        return self.step

    def train(self, resume: bool | str = False) -> list[dict]:
        """Run to ``total_steps``; returns this run's metric records (all of them, including resumed ones).
        ``resume``: True continues from the newest complete checkpoint; a path, from that verified checkpoint."""
        os.makedirs(self.out_dir, exist_ok=True)
        start = self.resume(resume if isinstance(resume, str) else None) if resume else 0
        self.metrics = MetricsLogger(os.path.join(self.out_dir, "metrics.jsonl"),
                                     resume_step=start if resume else None)
        total = self.total_steps
        bar = tqdm(total=total, initial=start, desc=self.name, disable=not self.config.progress,
                   dynamic_ncols=True, leave=True)
        saved_at = start if resume and start else None
        try:
            for step in range(start, total):
                t0 = time.perf_counter()
                rec = self.train_step(step)
                rec["step_seconds"] = time.perf_counter() - t0
                self.step = step + 1
                if self.config.log_every and (self.step % self.config.log_every == 0 or self.step == total):
                    self.metrics.log(self.step, rec)
                bar.update(1)
                bar.set_postfix({k: f"{rec[k]:.4g}" for k in self.progress_keys if k in rec}, refresh=False)
                if self.config.save_every and self.step % self.config.save_every == 0:
                    self.save(self.step)
                    saved_at = self.step
            if saved_at != total:
                self.save(total)
        finally:
            bar.close()
            self.metrics.close()
        return self.metrics.records
