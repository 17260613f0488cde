"""PPO for RLHF (Ziegler et al. 2019; Stiennon et al. 2020; InstructGPT) and its critic-free cousins.

One iteration (all math through :mod:`rlhf_fast.ops`; policy log-probs through the fused lm_head path)::

    rollout    y ~ pi_tau(. | x) from the engine (vLLM or HF generate), seeds derived from (seed, step)
    scoring    old_logp = log pi(y|x), ref_logp = log rho(y|x), V = critic, s = r(x, y) (reward model or callable)
    shaping    rewards[t] = s * [t = last] - beta * KL_t          (ops.shape_rewards; beta from the KL controller)
    advantage  gae:         A, R = ops.gae(rewards, V, mask, gamma, lam); A <- whiten(A)
               grpo / rloo: sequence return G = sum_t rewards[t];  A = ops.grpo_advantages / ops.rloo_advantages
                            over each prompt's samples_per_prompt completions, broadcast to tokens
               reinforce++: R = ops.reinforce_pp_returns(rewards, mask, gamma); A = whiten(R)
    update     ppo_epochs x minibatches (x grad_accum micro-batches):
               loss = ops.ppo_policy_loss + vf_coef * ops.ppo_value_loss - entropy_coef * H + ptx_coef * L_ptx
    sync       engine.sync_weights(policy)

The critic is a separate model (initialised from the reward model, as InstructGPT) or a value head on the
policy's backbone (``critic="head"``); the critic-free estimators skip it. The KL coefficient is fixed or
follows Ziegler's adaptive controller. Online mode (Ziegler): every ``online_rm_every`` iterations, sample 4
completions for ``online_comparisons`` prompts from the current policy, ask the labeler for the best, add the
comparisons to the buffer and train the reward model for ``online_rm_steps`` steps.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Callable, Sequence

import torch

from rlhf_fast import ops
from rlhf_fast.data.collators import collate_prompts, collate_sft
from rlhf_fast.models.policy_logprobs import policy_logprobs
from rlhf_fast.models.reward_model import RewardModel
from rlhf_fast.models.value_model import ValueModel
from rlhf_fast.rollout import RolloutBatch, logprob_mismatch
from rlhf_fast.trainer.base import Trainer, batch_indices, make_optimizer, step_seed
from rlhf_fast.trainer.config import PPOConfig
from rlhf_fast.trainer.kl_controller import make_kl_controller
from rlhf_fast.trainer.reward import comparison_step, group_batches

ESTIMATORS = ("gae", "grpo", "rloo", "reinforce++")
ScoreFn = Callable[[list[str], list[str]], Sequence[float]]
Labeler = Callable[[str, list[str]], int]


@dataclasses.dataclass
class Experience:
    """One iteration's rollouts, scored. ``[B, L]`` sequence tensors, ``[B, R]`` response tensors (R = L - P)."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask_full: torch.Tensor
    mask: torch.Tensor
    prompt_len: int
    old_logp: torch.Tensor | None      # None: single on-policy pass, the update's own forward is used
    rollout_logp: torch.Tensor
    advantages: torch.Tensor
    values: torch.Tensor | None
    returns: torch.Tensor | None
    onpolicy_logp: torch.Tensor | None = None   # single pass: the update's own log-probs, micro-batch by micro-batch


def decode_responses(tokenizer, batch: RolloutBatch) -> list[str]:
    return [tokenizer.decode(ids[m].tolist(), skip_special_tokens=True)
            for ids, m in zip(batch.response_ids, batch.response_mask)]


def _mean_stats(stats: list[dict]) -> dict:
    keys = stats[0].keys() if stats else []
    return {k: sum(float(s[k]) for s in stats) / len(stats) for k in keys}


class PPOTrainer(Trainer):
    """``PPOTrainer(config, policy, tokenizer, prompts, engine, reward_model=None, reward_fn=None, ...)``.

    policy: HF causal LM (trained); the frozen reference is a copy of it at construction (or ``ref_model``).
    prompts: prompt strings. engine: a :class:`rlhf_fast.rollout.RolloutEngine` generating from ``policy``.
    reward_model / reward_fn: r(x, y) from a :class:`RewardModel` or ``reward_fn(prompts, completions)``.
    true_score_fn: optional ``(prompts, completions) -> scores`` logged as ``true_score`` (never trained on).
    labeler, comparisons: online mode (``labeler(prompt, completions) -> best index``; the initial buffer).
    ptx_records: ``{"prompt", "completion"}`` records for the PPO-ptx loss.
    """
    name = "ppo"
    progress_keys = ("score", "true_score", "kl", "kl_coef", "entropy")

    def __init__(self, config: PPOConfig, policy, tokenizer, prompts: list[str], engine,
                 reward_model: RewardModel | None = None, reward_fn: ScoreFn | None = None,
                 ref_model=None, true_score_fn: ScoreFn | None = None, labeler: Labeler | None = None,
                 comparisons: list[dict] | None = None, ptx_records: list[dict] | None = None):
        super().__init__(config)
        cfg = config
        if cfg.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {cfg.estimator!r}")
        if cfg.critic not in ("separate", "head"):
            raise ValueError(f"critic must be 'separate' or 'head', got {cfg.critic!r}")
        if (reward_model is None) == (reward_fn is None):
            raise ValueError("give exactly one of reward_model and reward_fn")
        if cfg.estimator in ("grpo", "rloo") and cfg.samples_per_prompt < 2:
            raise ValueError(f"estimator {cfg.estimator!r} needs samples_per_prompt >= 2 (a group per prompt)")
        if cfg.minibatch_size < cfg.grad_accum:
            raise ValueError(f"minibatch_size ({cfg.minibatch_size}) must be >= grad_accum ({cfg.grad_accum})")
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
        self.use_ref = cfg.kl_coef > 0 or cfg.kl_target is not None
        self.ref_model = None
        if self.use_ref:
            self.ref_model = ref_model if ref_model is not None else copy.deepcopy(policy)
            self.ref_model.eval().requires_grad_(False)
        if reward_model is not None:
            reward_model.eval().requires_grad_(bool(cfg.online_rm_every))
        self.critic = None
        actor_params = list(policy.parameters())
        if cfg.estimator == "gae":
            if cfg.critic == "head":
                self.critic = ValueModel.on_policy(policy)
                actor_params += list(self.critic.head.parameters())
            elif reward_model is not None and cfg.init_value_from_reward:
                self.critic = ValueModel.from_reward_model(reward_model)
            else:
                self.critic = ValueModel(copy.deepcopy(ValueModel.on_policy(policy).backbone))
            self.critic.requires_grad_(True)
        self.optimizer, self.scheduler = make_optimizer(actor_params, cfg.lr, cfg.warmup_steps)
        self.critic_optimizer = None
        if self.critic is not None and cfg.critic == "separate":
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

    def _logprobs(self, model, ids, attn, resp_full, P, entropy=False):
        out = policy_logprobs(model, ids, attn, resp_full, temperature=self.config.temperature,
                              return_entropy=entropy)
        return tuple(o[:, P:] for o in out) if entropy else out[:, P:]

    def _values(self, ids, attn, P):
        """Critic value of the state before each response token: positions P-1 .. L-2."""
        return self.critic(ids, attn)[:, P - 1:-1]

    @torch.no_grad()
    def score(self, batch: RolloutBatch, prompts: list[str], completions: list[str]) -> torch.Tensor:
        if self.reward_model is not None:
            was = self.reward_model.training
            self.reward_model.eval()
            s = self.reward_model.score(batch.input_ids, batch.attention_mask)
            self.reward_model.train(was)
            return s.float()
        return torch.as_tensor(self.reward_fn(prompts, completions), dtype=torch.float32).reshape(len(batch))

    @torch.no_grad()
    def make_experience(self, batch: RolloutBatch, scores: torch.Tensor) -> tuple[Experience, dict]:
        cfg = self.config
        P = batch.prompt_length
        ids, attn, mask = batch.input_ids, batch.attention_mask, batch.response_mask
        resp_full = torch.cat([torch.zeros_like(batch.prompt_ids, dtype=torch.bool), mask], dim=1)
        self.policy.eval()
        # One on-policy pass (1 epoch, 1 minibatch: no optimizer step before any micro-batch's forward) without
        # a reference: old_logp is the update's own forward, detached (the ratio is 1 with gradient), so the
        # scoring forward is skipped (as TRL's GRPO).
        single_pass = not self.use_ref and cfg.ppo_epochs == 1 and cfg.minibatch_size >= len(batch)
        old_logp = None if single_pass else self._logprobs(self.policy, ids, attn, resp_full, P)
        ref_logp = self._logprobs(self.ref_model, ids, attn, resp_full, P) if self.use_ref else old_logp
        values = self._values(ids, attn, P) if self.critic is not None else None
        no_kl = torch.zeros_like(batch.rollout_logprobs)
        rewards, kl = ops.shape_rewards(scores, no_kl if old_logp is None else old_logp,
                                        no_kl if ref_logp is None else ref_logp, mask, self.kl_ctl.value,
                                        estimator=cfg.kl_estimator, reward_clip=cfg.reward_clip)
        returns = None
        if cfg.estimator == "gae":
            advantages, returns = ops.gae(rewards, values, mask, cfg.gamma, cfg.lam)
        elif cfg.estimator == "reinforce++":
            advantages = ops.reinforce_pp_returns(rewards, mask, cfg.gamma)
        else:
            seq_return = ops.masked_sum(rewards, mask, dim=1)
            adv = (ops.grpo_advantages(seq_return, cfg.samples_per_prompt) if cfg.estimator == "grpo"
                   else ops.rloo_advantages(seq_return, cfg.samples_per_prompt))
            advantages = ops.expand_to_tokens(adv, mask)
        if cfg.whiten_advantages and cfg.estimator in ("gae", "reinforce++"):
            advantages = ops.masked_whiten(advantages, mask)
        kl_seq = ops.masked_sum(kl, mask, dim=1)
        stats = {"score": scores.mean().item(), "score_std": scores.std().item() if len(scores) > 1 else 0.0,
                 "kl": kl_seq.mean().item(), "kl_coef": self.kl_ctl.value,
                 "response_length": mask.sum(1).float().mean().item(),
                 "truncated_frac": batch.truncated.float().mean().item(),
                 "advantage_mean": ops.masked_mean(advantages, mask).item()}
        if values is not None:
            stats["value_mean"] = ops.masked_mean(values, mask).item()
        if old_logp is not None:
            stats.update(self._mismatch(batch.rollout_logprobs, old_logp, mask))
        exp = Experience(ids, attn, resp_full, mask, P, old_logp, batch.rollout_logprobs, advantages, values,
                         returns, torch.zeros_like(batch.rollout_logprobs) if single_pass else None)
        return exp, stats

    @staticmethod
    def _mismatch(rollout_logp, learner_logp, mask) -> dict:
        """Rollout-engine vs learner log-probs of the sampled tokens (rlhf_fast.rollout.logprob_mismatch)."""
        return {f"mismatch_{k}": float(v) for k, v in logprob_mismatch(rollout_logp, learner_logp, mask).items()}

    def _ptx_loss(self, step: int, k: int) -> torch.Tensor:
        cfg = self.config
        idx = batch_indices(len(self.ptx_records), cfg.minibatch_size, cfg.seed + 1, step * 10_007 + k)
        b = collate_sft([self.ptx_records[i] for i in idx], self.tokenizer)
        logp = policy_logprobs(self.policy, b["input_ids"], b["attention_mask"], b["response_mask"])
        return -ops.masked_mean(logp, b["response_mask"])

    def micro_loss(self, exp: Experience, rows: torch.Tensor) -> tuple[torch.Tensor, dict]:
        cfg = self.config
        ids, attn, full = exp.input_ids[rows], exp.attention_mask[rows], exp.response_mask_full[rows]
        mask = exp.mask[rows]
        want_entropy = cfg.entropy_coef > 0 or cfg.log_entropy
        out = self._logprobs(self.policy, ids, attn, full, exp.prompt_len, entropy=want_entropy)
        logp, entropy = out if want_entropy else (out, None)
        stats = {}
        if exp.old_logp is None:
            old_logp = logp.detach()
            exp.onpolicy_logp[rows] = old_logp
        else:
            old_logp = exp.old_logp[rows]
        loss, pstats = ops.ppo_policy_loss(
            logp, old_logp, exp.advantages[rows], mask, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
            dual_clip=cfg.dual_clip, agg=cfg.loss_agg,
            rollout_logp=exp.rollout_logp[rows] if cfg.tis_cap is not None else None, tis_cap=cfg.tis_cap)
        stats.update({"policy_loss": loss.detach(), **{f"policy_{k}": v for k, v in pstats.items()}})
        if entropy is not None:
            ent = ops.masked_mean(entropy, mask)
            stats["entropy"] = ent.detach()
            if cfg.entropy_coef > 0:
                loss = loss - cfg.entropy_coef * ent
        if self.critic is not None:
            values = self._values(ids, attn, exp.prompt_len)
            vloss, vstats = ops.ppo_value_loss(values, exp.values[rows], exp.returns[rows], mask,
                                               clip=cfg.value_clip, agg=cfg.loss_agg)
            loss = loss + cfg.vf_coef * vloss
            stats.update({"value_loss": vloss.detach(), **{f"value_{k}": v for k, v in vstats.items()}})
        return loss, stats

    def update(self, exp: Experience, step: int) -> dict:
        cfg = self.config
        B = exp.input_ids.shape[0]
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        critic_params = list(self.critic.parameters()) if self.critic_optimizer is not None else []
        self.policy.train()
        all_stats = []
        k = 0
        for epoch in range(cfg.ppo_epochs):
            g = torch.Generator().manual_seed(step_seed(cfg.seed, step, salt=epoch + 1))
            perm = torch.randperm(B, generator=g)
            for mb in perm.split(cfg.minibatch_size):
                self.optimizer.zero_grad(set_to_none=True)
                if self.critic_optimizer is not None:
                    self.critic_optimizer.zero_grad(set_to_none=True)
                mb_stats = []
                for micro in mb.split(math.ceil(len(mb) / cfg.grad_accum)):
                    loss, stats = self.micro_loss(exp, micro)
                    if cfg.ptx_coef > 0:
                        ptx = self._ptx_loss(step, k)
                        stats["ptx_loss"] = ptx.detach()
                        loss = loss + cfg.ptx_coef * ptx
                    self.check_finite(step, loss=loss)
                    (loss * (len(micro) / len(mb))).backward()
                    mb_stats.append(stats)
                    k += 1
                stats = _mean_stats(mb_stats)
                stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).item()
                self.check_finite(step, grad_norm=stats["grad_norm"])
                self.optimizer.step()
                if self.critic_optimizer is not None:
                    torch.nn.utils.clip_grad_norm_(critic_params, cfg.max_grad_norm)
                    self.critic_optimizer.step()
                all_stats.append(stats)
        self.scheduler.step()
        out = _mean_stats(all_stats)
        if exp.old_logp is None:   # the mismatch over the whole batch, not a mean over micro-batches
            out.update(self._mismatch(exp.rollout_logp, exp.onpolicy_logp, exp.mask))
        return out

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
    def train_step(self, step: int) -> dict:
        cfg = self.config
        timings = {}
        t0 = time.perf_counter()
        idx = batch_indices(len(self.prompts), cfg.batch_size, cfg.seed, step)
        batch = self.generate([self.prompt_ids[i] for i in idx], cfg.samples_per_prompt, step_seed(cfg.seed, step))
        prompts = [self.prompts[idx[i]] for i in batch.prompt_index.tolist()]
        completions = decode_responses(self.tokenizer, batch)
        timings["time_generate"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        scores = self.score(batch, prompts, completions)
        self.check_finite(step, score=scores.sum())
        exp, stats = self.make_experience(batch, scores)
        if self.true_score_fn is not None:
            stats["true_score"] = float(torch.tensor(list(self.true_score_fn(prompts, completions)),
                                                     dtype=torch.float64).mean())
        timings["time_score"] = time.perf_counter() - t0

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
