"""PPO for RLHF (Ziegler et al. 2019; Stiennon et al. 2020; InstructGPT) and its critic-free cousins: the recipe.

One iteration; the algorithm lives in :mod:`rlhf_fast.algos`, the math in :mod:`rlhf_fast.ops`::

    rollout     y ~ pi_tau(. | x) from the engine (vLLM or HF generate), seeds derived from (seed, step)
    scoring     old_logp = log pi(y|x), ref_logp = log rho(y|x), V = critic, s = r(x, y) (reward model or callable)
    (DAPO)      with dynamic_sampling: groups of equal scores dropped, more prompts sampled to refill the batch
    experience  algos.make_experience: rewards = s * [t = last] - beta * KL_t;  A, R = ADVANTAGE_ESTIMATORS[estimator]
    guard       mean |log pi_engine - log pi_learner| > max_mismatch stops the run (stale sync, wrong temperature...)
    update      ppo_epochs x minibatches x grad_accum micro-batches of algos.ppo_objective (policy + value +
                entropy + ptx), every micro-batch normalised by its minibatch's totals: one optimizer step per minibatch
    sync        engine.sync_weights(policy)

The critic is a separate model (initialised from the reward model, as InstructGPT) or a value head on the
policy's backbone (``critic="head"``: one backbone forward gives log-probs and values); the critic-free
estimators have none. A peft LoRA policy (:mod:`rlhf_fast.models.lora`) is its own reference: the base with the
adapter disabled, no second copy of the weights; the engine then receives only its changed layers, merged. The KL coefficient is fixed or follows Ziegler's adaptive controller. Online mode
(Ziegler): every ``online_rm_every`` iterations, sample 4 completions for ``online_comparisons`` prompts from the
current policy, ask the labeler for the best, add the comparisons to the buffer and train the reward model for
``online_rm_steps`` steps.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from typing import Callable, Sequence

import torch

from rlhf_fast.algos import AdvantageParams, Experience, Outputs, make_experience, ppo_objective
from rlhf_fast.algos.advantages import get_estimator
from rlhf_fast.algos.dynamic_sampling import fill_groups
from rlhf_fast.algos.fused_objective import fusable, fused_policy_terms, policy_head
from rlhf_fast.data.collators import collate_prompts, collate_sft
from rlhf_fast.models.lora import is_lora, reference_mode
from rlhf_fast.models.packing import resolve_packing
from rlhf_fast.models.policy_logprobs import policy_logprobs
from rlhf_fast.models.reward_model import RewardModel
from rlhf_fast.models.value_model import ValueModel
from rlhf_fast.ops.agg import batch_totals
from rlhf_fast.rollout import RolloutBatch, logprob_mismatch
from rlhf_fast.trainer.base import Trainer, batch_indices, make_optimizer, step_seed
from rlhf_fast.trainer.checkpoint import latest_checkpoint
from rlhf_fast.trainer.config import PPOConfig
from rlhf_fast.trainer.kl_controller import make_kl_controller
from rlhf_fast.trainer.reward import comparison_step, group_batches

ScoreFn = Callable[[list[str], list[str]], Sequence[float]]
Labeler = Callable[[str, list[str]], int]
__all__ = ["PPOTrainer", "Experience", "RolloutMismatchError", "decode_responses"]


class RolloutMismatchError(RuntimeError):
    """The engine's log-probs of its own samples disagree with the learner's beyond ``max_mismatch``."""


def decode_responses(tokenizer, batch: RolloutBatch) -> list[str]:
    return [tokenizer.decode(ids[m].tolist(), skip_special_tokens=True)
            for ids, m in zip(batch.response_ids, batch.response_mask)]


def _mean_stats(stats: list[dict]) -> dict:
    keys = stats[0].keys() if stats else []
    return {k: sum(float(s[k]) for s in stats) / len(stats) for k in keys}


def _split(n: int, parts: int) -> tuple[torch.Tensor, ...]:
    """``range(n)`` cut into ``min(parts, n)`` contiguous, non-empty micro-batches of near-equal sizes."""
    return torch.tensor_split(torch.arange(n), min(parts, n))


class PPOTrainer(Trainer):
    """``PPOTrainer(config, policy, tokenizer, prompts, engine, reward_model=None, reward_fn=None, ...)``.

    policy: HF causal LM (trained); the frozen reference is a copy of it at construction (or ``ref_model``; a
    peft LoRA policy: itself with the adapter disabled, no copy).
    prompts: prompt strings. engine: a :class:`rlhf_fast.rollout.RolloutEngine` generating from ``policy``.
    reward_model / reward_fn: r(x, y) from a :class:`RewardModel` or ``reward_fn(prompts, completions)``.
    true_score_fn: optional ``(prompts, completions) -> scores`` logged as ``true_score`` (never trained on).
    labeler, comparisons: online mode (``labeler(prompt, completions) -> best index``; the initial buffer).
    ptx_records: ``{"prompt", "completion"}`` records for the PPO-ptx loss.
    The config (estimator, policy loss, aggregation...) is validated when it is built (:class:`PPOConfig`).
    """
    name = "ppo"
    progress_keys = ("score", "true_score", "kl", "kl_coef", "entropy")
    fused_objective = True   # the policy + entropy terms through ops.linear_ppo_objective where the objective allows

    def __init__(self, config: PPOConfig, policy, tokenizer, prompts: list[str], engine,
                 reward_model: RewardModel | None = None, reward_fn: ScoreFn | None = None,
                 ref_model=None, true_score_fn: ScoreFn | None = None, labeler: Labeler | None = None,
                 comparisons: list[dict] | None = None, ptx_records: list[dict] | None = None):
        super().__init__(config)
        cfg = config
        if (reward_model is None) == (reward_fn is None):
            raise ValueError("give exactly one of reward_model and reward_fn")
        if cfg.ptx_coef > 0 and not ptx_records:
            raise ValueError("ptx_coef > 0 needs ptx_records (PPOConfig.ptx_data)")
        if cfg.online_rm_every and (labeler is None or reward_model is None):
            raise ValueError("online_rm_every needs a labeler and a reward_model")
        if not prompts:
            raise ValueError("PPOTrainer needs at least one prompt")
        self.policy, self.tokenizer, self.engine = policy, tokenizer, engine
        self.prompts = list(prompts)
        self.prompt_ids = collate_prompts([{"prompt": p} for p in self.prompts], tokenizer)
        self.reward_model, self.reward_fn, self.true_score_fn = reward_model, reward_fn, true_score_fn
        self.labeler, self.comparisons = labeler, list(comparisons or [])
        self.ptx_records = ptx_records or []
        self.kl_ctl = make_kl_controller(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        self.use_ref = cfg.uses_ref
        self.ref_model = None      # with use_ref: None means the LoRA policy's base (reference_mode)
        if self.use_ref and (ref_model is not None or not is_lora(policy)):
            self.ref_model = ref_model if ref_model is not None else copy.deepcopy(policy)
            self.ref_model.eval().requires_grad_(False)
        if reward_model is not None:
            reward_model.eval().requires_grad_(bool(cfg.online_rm_every))
        self.critic = None
        actor_params = list(policy.parameters())
        if get_estimator(cfg.estimator).needs_critic:
            if cfg.critic == "head":
                self.critic = ValueModel.on_policy(policy)
                actor_params += list(self.critic.head.parameters())
            elif reward_model is not None and cfg.init_value_from_reward:
                self.critic = ValueModel.from_reward_model(reward_model)
            else:
                self.critic = ValueModel(copy.deepcopy(ValueModel.on_policy(policy).backbone))
            # a value head trains with the policy's (possibly LoRA-frozen) backbone as the policy does
            (self.critic.head if cfg.critic == "head" else self.critic).requires_grad_(True)
        self.value_head = self.critic is not None and cfg.critic == "head"
        self.pack = resolve_packing(cfg.pack_sequences, policy)
        self.optimizer, self.scheduler = make_optimizer(actor_params, cfg.lr, cfg.warmup_steps)
        self.critic_optimizer = None
        if self.critic is not None and not self.value_head:
            self.critic_optimizer, _ = make_optimizer(self.critic.parameters(), cfg.critic_lr)
        self.rm_optimizer = None
        if cfg.online_rm_every:
            self.rm_optimizer, _ = make_optimizer(reward_model.parameters(), cfg.critic_lr)

    # -- checkpoint state -------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        return self.config.steps

    def checkpoint_models(self):
        models = {"policy": self.policy}
        if self.critic is not None:
            models["critic" if self.config.critic == "separate" else "value_head"] = \
                self.critic if self.config.critic == "separate" else self.critic.head
        if self.config.online_rm_every:
            models["reward_model"] = self.reward_model
        return models

    def state_dict(self) -> dict:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "kl_controller": self.kl_ctl.state_dict()}
        if self.critic_optimizer is not None:
            state["critic_optimizer"] = self.critic_optimizer.state_dict()
        if self.rm_optimizer is not None:
            state["rm_optimizer"] = self.rm_optimizer.state_dict()
            state["comparisons"] = self.comparisons
        return state

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        if self.critic_optimizer is not None:
            self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        if self.rm_optimizer is not None:
            self.rm_optimizer.load_state_dict(state["rm_optimizer"])
            self.comparisons = list(state["comparisons"])

    def on_resume(self) -> None:
        self.engine.sync_weights(self.policy)

    # -- pieces of an iteration -------------------------------------------------------------------
    def generate(self, prompt_ids: list[list[int]], n: int, seed: int) -> RolloutBatch:
        cfg = self.config
        return self.engine.generate(prompt_ids, n=n, temperature=cfg.temperature, top_p=cfg.top_p,
                                    top_k=cfg.top_k if cfg.top_k > 0 else None, max_new_tokens=cfg.max_new_tokens,
                                    seed=seed)

    def forward(self, ids, attn, response_mask_full, P: int, policy: bool = True, entropy: bool = False) -> Outputs:
        """The learner on ``[b, L]`` sequences: the policy's response log-probs (and entropy) when ``policy``,
        and the critic's values of the state before each response token (positions P-1 .. L-2). A value head on
        the policy's backbone reads the policy forward's hidden states: one backbone pass for both."""
        logp = ent = hidden = None
        if policy or self.value_head:
            out = policy_logprobs(self.policy, ids, attn, response_mask_full, temperature=self.config.temperature,
                                  return_entropy=entropy, return_hidden=self.value_head, pack=self.pack)
            out = out if isinstance(out, tuple) else (out,)
            logp, ent, hidden = out[0][:, P:], (out[1][:, P:] if entropy else None), out[-1]
        return Outputs(logp if policy else None, ent, self._values(ids, attn, P, hidden))

    def _values(self, ids, attn, P: int, hidden: torch.Tensor | None):
        """The critic's values before each response token; a value head reads the policy's ``hidden``."""
        if self.value_head:
            return self.critic.from_hidden(hidden)[:, P - 1:-1]
        return None if self.critic is None else self.critic(ids, attn)[:, P - 1:-1]

    def uses_fused_objective(self) -> bool:
        return self.fused_objective and fusable(self.config)

    def fused_forward(self, piece: Experience, totals: tuple[int, int], entropy: bool) -> tuple[Outputs, torch.Tensor]:
        """The micro-batch's forward through the fused objective: ``(outputs, L_policy - entropy_coef * H)``, the
        outputs' log-probs/entropy detached (for the stats), the term differentiable (algos.fused_objective)."""
        head, hidden = policy_head(self.policy, piece.input_ids, piece.attention_mask, piece.prompt_len, self.pack)
        term, logp, ent = fused_policy_terms(self.config, piece, head, totals, entropy)
        return Outputs(logp, ent, self._values(piece.input_ids, piece.attention_mask, piece.prompt_len, hidden)), term

    @torch.no_grad()
    def score(self, batch: RolloutBatch, prompts: list[str], completions: list[str]) -> torch.Tensor:
        if self.reward_model is not None:
            was = self.reward_model.training
            self.reward_model.eval()
            s = self.reward_model.score(batch.input_ids, batch.attention_mask)
            self.reward_model.train(was)
            return s.float()
        return torch.as_tensor(self.reward_fn(prompts, completions), dtype=torch.float32).reshape(len(batch))

    def single_pass(self, n_rollouts: int) -> bool:
        """One epoch, one minibatch, no reference: no optimizer step comes before any micro-batch's forward, so
        the update's own detached log-probs are the old ones and the scoring forward is skipped (as TRL's GRPO)."""
        cfg = self.config
        return not self.use_ref and cfg.ppo_epochs == 1 and cfg.minibatch_size >= n_rollouts

    @torch.no_grad()
    def make_experience(self, batch: RolloutBatch, scores: torch.Tensor) -> tuple[Experience, dict]:
        """The scoring forwards (policy, reference, critic), then the pure :func:`rlhf_fast.algos.make_experience`."""
        cfg = self.config
        self.policy.eval()
        seq = (batch.input_ids, batch.attention_mask, batch.response_mask_full, batch.prompt_length)
        out = self.forward(*seq, policy=not self.single_pass(len(batch)))
        ref_logp = None
        if self.use_ref:
            with reference_mode(self.policy) if self.ref_model is None else contextlib.nullcontext():
                ref = self.policy if self.ref_model is None else self.ref_model
                ref_logp = policy_logprobs(ref, *seq[:3], temperature=cfg.temperature, pack=self.pack)[:, seq[3]:]
        params = AdvantageParams(cfg.gamma, cfg.lam, cfg.samples_per_prompt, cfg.whiten_advantages)
        exp, stats = make_experience(batch, scores, out.logp, ref_logp, out.values, estimator=cfg.estimator,
                                     params=params, kl_coef=self.kl_ctl.value, kl_estimator=cfg.kl_estimator,
                                     reward_clip=cfg.reward_clip)
        if out.logp is not None:
            stats.update(self._mismatch(batch.rollout_logprobs, out.logp, batch.response_mask))
        return exp, stats

    def _mismatch(self, rollout_logp, learner_logp, mask) -> dict:
        """Rollout-engine vs learner log-probs of the sampled tokens (rlhf_fast.rollout.logprob_mismatch), with
        the loss's TIS cap (2 when the loss has none)."""
        cap = self.config.tis_cap if self.config.tis_cap is not None else 2.0
        return {f"mismatch_{k}": float(v) for k, v in logprob_mismatch(rollout_logp, learner_logp, mask, cap).items()}

    def check_mismatch(self, step: int, stats: dict) -> None:
        """Stop the run when ``mismatch_abs_diff_mean`` exceeds ``max_mismatch`` (before any optimizer step on
        these rollouts), naming the likely causes and the last good checkpoint."""
        limit, value = self.config.max_mismatch, stats.get("mismatch_abs_diff_mean")
        if limit is None or value is None or value <= limit:
            return
        last = latest_checkpoint(self.out_dir)
        raise RolloutMismatchError(
            f"[{self.name}] rollout/learner mismatch at step {step + 1}: mean |log pi_engine - log pi_learner| = "
            f"{value:.4g} nats over {stats['mismatch_tokens']} tokens (max {stats['mismatch_abs_diff_max']:.4g}), "
            f"above max_mismatch = {limit:g}. The engine is not sampling from the policy being trained, so the "
            f"update would be off-policy garbage. Likely causes: a stale or broken weight sync (the engine keeps "
            f"old weights: check sync_weights and the engine's weight_version), a temperature or top-k/top-p "
            f"mismatch between the engine and the learner (the learner scores at temperature "
            f"{self.config.temperature:g}, unfiltered), or a tokenizer/chat-template mismatch between the engine "
            f"and the learner. The run stopped before the optimizer step; last good checkpoint: "
            f"{last or 'none (nothing saved yet)'}. Fix the cause and resume with --resume, or raise "
            f"max_mismatch (none disables the guard).")

    def _ptx_batch(self, step: int, k: int) -> dict:
        cfg = self.config
        idx = batch_indices(len(self.ptx_records), cfg.minibatch_size, cfg.seed + 1, step * 10_007 + k)
        return collate_sft([self.ptx_records[i] for i in idx], self.tokenizer)

    def micro_batches(self, mb: Experience) -> tuple[torch.Tensor, list[Experience]]:
        """``(order, pieces)``: ``mb``'s rows in update order and its ``grad_accum`` micro-batches of them.
        ``group_by_length``: rows sorted by response length, each piece cut to its own longest prompt and
        response (Experience.trim), so a micro-batch of short rows runs short sequences."""
        cfg = self.config
        order = torch.argsort(mb.mask.sum(1), stable=True) if cfg.group_by_length else torch.arange(len(mb))
        pieces = [mb.rows(order[m]) for m in _split(len(mb), cfg.grad_accum)]
        return order, [p.trim() for p in pieces] if cfg.group_by_length else pieces

    def accumulate(self, mb: Experience, step: int, ptx: dict | None = None) -> tuple[dict, Outputs]:
        """Forward and backward of minibatch ``mb`` (and its ptx batch) in ``grad_accum`` micro-batches, each
        normalised by the minibatch's totals ``(N, S, width)``, so the accumulated gradient is the minibatch's
        (the micro-batches of :meth:`micro_batches`, length-grouped by default). Returns the
        objective's stats on the whole minibatch (floats) and the detached outputs (rows in ``mb``'s order)."""
        cfg = self.config
        width = mb.mask.shape[1]
        totals = (*batch_totals(mb.mask), width)
        order, pieces = self.micro_batches(mb)
        ptx_mask = ptx_totals = None
        ptx_micros = [None] * len(pieces)
        if ptx is not None:    # the ptx batch, cut into as many micro-batches, with its own totals
            ptx_mask, ptx_totals = ptx["response_mask"], batch_totals(ptx["response_mask"])
            ptx_micros = _split(len(ptx_mask), len(pieces))
        outs = []
        for piece, pr in zip(pieces, ptx_micros):
            entropy, term = cfg.entropy_coef > 0 or cfg.log_entropy, None
            if self.uses_fused_objective():
                out, term = self.fused_forward(piece, totals, entropy)
            else:
                out = self.forward(piece.input_ids, piece.attention_mask, piece.response_mask_full, piece.prompt_len,
                                   entropy=entropy)
            if pr is not None:
                out = out._replace(ptx_logp=policy_logprobs(self.policy, ptx["input_ids"][pr],
                                                            ptx["attention_mask"][pr], ptx_mask[pr], pack=self.pack))
            loss, _ = ppo_objective(cfg, piece, out, totals, None if pr is None else ptx_mask[pr], ptx_totals,
                                    policy_term=term)
            self.check_finite(step, loss=loss)
            loss.backward()
            outs.append(out.detach().pad_to(width))
        whole = Outputs.cat(outs)
        inv = torch.argsort(order)     # back to mb's row order (the ptx rows keep theirs)
        whole = whole._replace(**{k: v[inv] for k, v in whole._asdict().items() if v is not None and k != "ptx_logp"})
        with torch.no_grad():
            _, stats = ppo_objective(cfg, mb, whole, totals, ptx_mask, ptx_totals)
        return {k: float(v) for k, v in stats.items()}, whole

    def update(self, exp: Experience, step: int) -> dict:
        """ppo_epochs x minibatches, one optimizer step each (stats: the mean over minibatches). In the single
        on-policy pass the update's own log-probs give the mismatch metrics, guarded before the step."""
        cfg = self.config
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        critic_params = list(self.critic.parameters()) if self.critic_optimizer is not None else []
        optimizers = [self.optimizer] + ([self.critic_optimizer] if self.critic_optimizer is not None else [])
        self.policy.train()
        all_stats, mismatch = [], {}
        for epoch in range(cfg.ppo_epochs):
            g = torch.Generator().manual_seed(step_seed(cfg.seed, step, salt=epoch + 1))
            for rows in torch.randperm(len(exp), generator=g).split(cfg.minibatch_size):
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                mb = exp.rows(rows)
                ptx = self._ptx_batch(step, len(all_stats)) if cfg.ptx_coef > 0 else None
                stats, out = self.accumulate(mb, step, ptx)
                if exp.old_logp is None:
                    mismatch = self._mismatch(mb.rollout_logp, out.logp, mb.mask)
                    self.check_mismatch(step, mismatch)
                stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).item()
                self.check_finite(step, grad_norm=stats["grad_norm"])
                self.optimizer.step()
                if self.critic_optimizer is not None:
                    torch.nn.utils.clip_grad_norm_(critic_params, cfg.max_grad_norm)
                    self.critic_optimizer.step()
                all_stats.append(stats)
        self.scheduler.step()
        return {**_mean_stats(all_stats), **mismatch}

    def online_rm_round(self, step: int) -> dict:
        """Ziegler's online data collection: label best-of-4 samples of the current policy, retrain the RM."""
        cfg = self.config
        idx = batch_indices(len(self.prompts), cfg.online_comparisons, cfg.seed + 2, step)
        prompts = [self.prompts[i] for i in idx]
        batch = self.generate([self.prompt_ids[i] for i in idx], n=4, seed=step_seed(cfg.seed, step, salt=99))
        texts = decode_responses(self.tokenizer, batch)
        for j, p in enumerate(prompts):
            group = texts[4 * j:4 * j + 4]
            self.comparisons.append({"prompt": p, "completions": group, "best": int(self.labeler(p, group))})
        stats = []
        batches = group_batches(self.comparisons, cfg.minibatch_size, cfg.seed + 3, step)
        for b in (batches * math.ceil(cfg.online_rm_steps / len(batches)))[:cfg.online_rm_steps]:
            rec, _ = comparison_step(self.reward_model, self.rm_optimizer, self.tokenizer,
                                     [self.comparisons[i] for i in b], cfg.max_grad_norm,
                                     check_finite=lambda **v: self.check_finite(step, **v))
            stats.append(rec)
        self.reward_model.eval()
        s = _mean_stats(stats)
        return {"rm_loss": s["loss"], "rm_accuracy": s["accuracy"], "rm_comparisons": len(self.comparisons)}

    # -- the iteration ----------------------------------------------------------------------------
    def rollout(self, step: int, idx: list[int], seed: int, timings: dict):
        """``samples_per_prompt`` completions of prompts ``idx``, scored: ``(batch, prompts, completions, scores)``
        (``time_generate`` / ``time_score`` accumulate in ``timings``)."""
        t0 = time.perf_counter()
        batch = self.generate([self.prompt_ids[i] for i in idx], self.config.samples_per_prompt, seed)
        prompts = [self.prompts[idx[i]] for i in batch.prompt_index.tolist()]
        completions = decode_responses(self.tokenizer, batch)
        t1 = time.perf_counter()
        scores = self.score(batch, prompts, completions)
        self.check_finite(step, score=scores.sum())
        timings["time_generate"] = timings.get("time_generate", 0.0) + t1 - t0
        timings["time_score"] = timings.get("time_score", 0.0) + time.perf_counter() - t1
        return batch, prompts, completions, scores

    def dynamic_rollout(self, step: int, timings: dict):
        """DAPO dynamic sampling (:func:`rlhf_fast.algos.dynamic_sampling.fill_groups`): round 0 is the usual
        rollout, round r >= 1 samples with the seed of ``(seed, step, r)``. Returns ``(batch, prompts,
        completions, scores, stats)``; ``batch`` is None when no group had differing rewards."""
        cfg = self.config

        def one_round(idx: list[int], r: int):
            seed = step_seed(cfg.seed, step, salt=1000 + r) if r else step_seed(cfg.seed, step)
            batch, _, _, scores = self.rollout(step, idx, seed, timings)
            return batch, scores

        batch, scores, kept, stats = fill_groups(
            one_round, batch_indices(len(self.prompts), cfg.batch_size, cfg.seed, step), len(self.prompts),
            batch_size=cfg.batch_size, group_size=cfg.samples_per_prompt, max_rounds=cfg.max_sampling_rounds,
            pad_id=self.engine.pad_token_id, seed=step_seed(cfg.seed, step, salt=2000))
        stats["dynamic_sampling_skipped"] = float(batch is None)
        if batch is None:
            return None, [], [], None, stats
        prompts = [self.prompts[kept[i]] for i in batch.prompt_index.tolist()]
        return batch, prompts, decode_responses(self.tokenizer, batch), scores, stats

    def train_step(self, step: int) -> dict:
        cfg = self.config
        timings, stats = {}, {}
        if cfg.dynamic_sampling:
            batch, prompts, completions, scores, stats = self.dynamic_rollout(step, timings)
            if batch is None:   # nothing to learn from: no update, no sync (same weights), no online-RM round
                return {**stats, "tokens": 0, **timings}
        else:
            idx = batch_indices(len(self.prompts), cfg.batch_size, cfg.seed, step)
            batch, prompts, completions, scores = self.rollout(step, idx, step_seed(cfg.seed, step), timings)

        t0 = time.perf_counter()
        exp, exp_stats = self.make_experience(batch, scores)
        stats.update(exp_stats)
        self.check_mismatch(step, stats)
        if self.true_score_fn is not None:
            stats["true_score"] = float(torch.tensor(list(self.true_score_fn(prompts, completions)),
                                                     dtype=torch.float64).mean())
        timings["time_score"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        stats.update(self.update(exp, step))
        self.kl_ctl.update(stats["kl"], n_steps=len(batch))
        timings["time_update"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        self.engine.sync_weights(self.policy)
        timings["time_sync"] = time.perf_counter() - t0
        if cfg.online_rm_every and (step + 1) % cfg.online_rm_every == 0:
            t0 = time.perf_counter()
            stats.update(self.online_rm_round(step))
            timings["time_online_rm"] = time.perf_counter() - t0
        stats["tokens"] = int(exp.mask.sum())
        return {**stats, **timings}
