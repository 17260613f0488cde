"""Direct preference optimisation (and IPO, SimPO, hinge) from pairwise comparisons.

For a batch of pairs (x, y_c, y_r) the 2B sequences ``[x | y_c]``, ``[x | y_r]`` go through the policy in ONE
forward (record-major: row 2i chosen, 2i+1 rejected), their log-probs through the fused lm_head path
(:func:`rlhf_fast.models.policy_logprobs`: the ``[tokens, vocab]`` logits never exist, forward or backward)::

    logp_s = sum_t m[s,t] log pi(y[s,t] | y[s,<t])          len_s = sum_t m[s,t]       m: completion mask
    loss   = preference_loss(logp_c, logp_r, ref_c, ref_r, len_c, len_r)    (rlhf_fast.ops.preference)

The reference log-probs ``ref`` [N, 2] are computed once, before the first update, over the whole dataset
(no_grad, same forward) and cached in the trainer state (checkpoints carry them, so a resumed run uses the
original reference); SimPO has none. The reference is ``ref_model`` when given, else the policy as given
(the SFT model) before its first update: with a LoRA policy (:mod:`rlhf_fast.models.lora`) the base with the
adapter disabled. Either way no second copy of the policy's weights is held while training.
``micro_batch_size`` pairs per forward/backward bound the activation memory; their gradients add up to the
full batch's (each micro-batch's mean loss is weighted by its share of the pairs).
Best-of-K records become K-1 pairs (the best against each other completion). Metrics as TRL's:
``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``,
``logps/rejected`` (batch means).
"""
from __future__ import annotations

import math

import torch

from rlhf_fast.data.collators import as_best_of_k, collate_comparisons
from rlhf_fast.models.lora import reference_mode
from rlhf_fast.models.packing import resolve_packing
from rlhf_fast.models.policy_logprobs import policy_logprobs
from rlhf_fast.ops.preference import needs_reference, preference_loss
from rlhf_fast.trainer.base import Trainer, batch_indices, make_optimizer

__all__ = ["DPOTrainer", "preference_pairs", "sequence_logps"]

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def preference_pairs(records: list[dict]) -> list[dict]:
    """Pairwise ``{"prompt", "chosen", "rejected"}`` records; a best-of-K record gives K-1 pairs."""
    pairs = []
    for r in records:
        if "completions" not in r:
            pairs.append({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]})
            continue
        r = as_best_of_k(r)
        best = r["completions"][r["best"]]
        pairs += [{"prompt": r["prompt"], "chosen": best, "rejected": c}
                  for k, c in enumerate(r["completions"]) if k != r["best"]]
    return pairs


def sequence_logps(model, batch: dict, pack: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of completion-token log-probs [S], completion lengths [S])`` for a batch of chosen and rejected rows;
    ``pack``: the decoder runs padding-free (:mod:`rlhf_fast.models.packing`)."""
    logp = policy_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"], pack=pack)
    return logp.sum(-1), batch["response_mask"].sum(-1)


class DPOTrainer(Trainer):
    name = "dpo"
    progress_keys = ("loss", "rewards/accuracies", "rewards/margins")

    def __init__(self, config, model, tokenizer, records: list[dict], ref_model=None):
        super().__init__(config)
        self.pairs = preference_pairs(records)
        if not self.pairs:
            raise ValueError("DPOTrainer needs at least one comparison record")
        self.model, self.tokenizer, self.ref_model = model, tokenizer, ref_model
        self.pack = resolve_packing(config.pack_sequences, model)
        self.optimizer, self.scheduler = make_optimizer(model.parameters(), config.lr, config.warmup_steps)
        self.ref_logps: torch.Tensor | None = None        # [N, 2] (chosen, rejected), filled before step 1

    @property
    def total_steps(self) -> int:
        return self.config.max_steps or self.config.epochs * math.ceil(len(self.pairs) / self.config.batch_size)

    def checkpoint_models(self):
        return {"policy": self.model}

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "ref_logps": self.ref_logps}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.ref_logps = state["ref_logps"]

    def _micro_batches(self, idx: list[int]) -> list[list[int]]:
        size = self.config.micro_batch_size or len(idx)
        return [idx[i:i + size] for i in range(0, len(idx), size)]

    @torch.no_grad()
    def compute_reference(self) -> torch.Tensor:
        """Reference log-probs of every pair, ``[N, 2]`` fp32 (one pass over the dataset; ``ref_model``, else the
        policy with its adapter disabled)."""
        ref = self.ref_model if self.ref_model is not None else self.model
        was_training = ref.training
        ref.eval()
        out = []
        with reference_mode(ref):
            for chunk in self._micro_batches(list(range(len(self.pairs)))):
                logps, _ = sequence_logps(ref, collate_comparisons([self.pairs[i] for i in chunk], self.tokenizer),
                                          self.pack)
                out.append(logps.view(-1, 2))
        ref.train(was_training)
        return torch.cat(out).float()

    def train_step(self, step: int) -> dict:
        cfg = self.config
        use_ref = needs_reference(cfg.loss_type)
        if use_ref and self.ref_logps is None:
            self.ref_logps = self.compute_reference()
            self.ref_model = None          # cached: a separate reference model is no longer needed
        idx = batch_indices(len(self.pairs), cfg.batch_size, cfg.seed, step)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for chunk in self._micro_batches(idx):
            batch = collate_comparisons([self.pairs[i] for i in chunk], self.tokenizer)
            logps, lengths = sequence_logps(self.model, batch, self.pack)
            ref_c, ref_r = self.ref_logps[chunk].unbind(1) if use_ref else (None, None)
            loss, stats = preference_loss(logps[0::2], logps[1::2], ref_c, ref_r, lengths[0::2], lengths[1::2],
                                          loss_type=cfg.loss_type, beta=cfg.beta,
                                          label_smoothing=cfg.label_smoothing,
                                          gamma=cfg.simpo_gamma if cfg.loss_type == "simpo" else 0.0)
            self.check_finite(step, loss=loss)
            share = len(chunk) / len(idx)
            (loss * share).backward()
            stats = {**stats, "loss": loss.detach(), "logps/chosen": logps[0::2].detach(),
                     "logps/rejected": logps[1::2].detach()}
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + share * v.double().mean().item()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        self.check_finite(step, grad_norm=grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        return {**totals, "grad_norm": grad_norm.item(), "lr": self.scheduler.get_last_lr()[0]}

