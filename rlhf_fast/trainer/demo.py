"""The end-to-end demo: SFT -> reward model from best-of-4 comparisons -> PPO with vLLM rollouts, on the
synthetic sorting task (:class:`rlhf_fast.data.SortTask`) with a tiny Llama, on CPU in a few minutes.

Writes ``<out>/<name>/``: ``metrics.jsonl`` (PPO, one record per iteration), ``sft/`` and ``rm/`` (their
metrics), ``comparisons.jsonl``, ``sft_model/``, ``reward_model/``, ``policy/`` (final), ``checkpoints/``,
``ppo.png`` (reward, KL, entropy, value loss per step) and ``summary.json``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time

import torch

from rlhf_fast.data import SortTask, build_tokenizer, write_jsonl
from rlhf_fast.models import RewardModel, build_tiny_llama, save_model, tiny_llama_config
from rlhf_fast.trainer.config import (ENGINES, Config, ConfigError, PPOConfig, RewardConfig, SFTConfig, key,
                                      to_dict)
from rlhf_fast.trainer.engines import build_engine
from rlhf_fast.trainer.metrics import plot_metrics
from rlhf_fast.trainer.ppo import PPOTrainer, decode_responses
from rlhf_fast.trainer.reward import RewardTrainer
from rlhf_fast.trainer.sft import SFTTrainer


@dataclasses.dataclass
class DemoConfig(Config):
    """The end-to-end demo: SFT -> reward model from best-of-4 comparisons -> PPO, on the sorting task."""
    out: str = key("runs", "parent of the run directory")
    name: str = key("demo", "run directory name under out")
    seed: int = key(0, "seed of everything", ge=0)
    engine: str = key("auto", "rollout engine (auto: vllm if importable)", choices=ENGINES)
    hidden_size: int = key(128, "tiny Llama hidden size (a multiple of the head size 64)", ge=64)
    num_layers: int = key(2, "tiny Llama decoder layers", ge=1)
    intermediate_size: int = key(256, "tiny Llama MLP size", ge=1)
    min_len: int = key(4, "fewest digits in a prompt", ge=1)
    max_len: int = key(6, "most digits in a prompt", ge=1)
    labeler_temperature: float = key(0.05, "simulated labeler's softmax temperature", gt=0)
    demo_sorted_fraction: float = key(0.2, "share of SFT demonstrations that are sorted (the rest shuffled)",
                                      ge=0, le=1)
    sft_examples: int = key(4000, "SFT demonstrations", ge=1)
    comparisons: int = key(3000, "best-of-4 comparisons from the labeler", ge=2)
    heldout_fraction: float = key(0.15, "share of comparisons held out", gt=0, lt=1)
    eval_prompts: int = key(512, "prompts of the true-score evaluation", ge=1)
    threads: int = key(1, "torch threads for the learner (0: torch default; 1 is fastest for this tiny model)",
                       ge=0)
    sft: SFTConfig = key(help="SFT stage", default_factory=lambda: SFTConfig(lr=3e-3, batch_size=64, epochs=2,
                                                                              warmup_steps=10))
    rm: RewardConfig = key(help="reward-model stage", default_factory=lambda: RewardConfig(
        lr=1e-3, batch_size=32, epochs=3, warmup_steps=10))
    ppo: PPOConfig = key(help="PPO stage", default_factory=lambda: PPOConfig(
        lr=3e-4, critic_lr=1e-3, steps=100, batch_size=64, ppo_epochs=2, minibatch_size=32, kl_coef=0.2,
        kl_target=6.0, kl_horizon=200.0, save_every=10))

    def check(self) -> None:
        if self.max_len < self.min_len:
            raise ConfigError(f"must be >= min_len ({self.min_len}), got {self.max_len}", "max_len")
        if self.hidden_size % 64:
            raise ConfigError(f"must be a multiple of 64 (the head size), got {self.hidden_size}", "hidden_size")


def _log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _sample(engine, tokenizer, prompts: list[str], n: int, seed: int, max_new: int) -> tuple[list[str], list[str]]:
    """``n`` completions per prompt at temperature 1: (prompt of each row, completion text)."""
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    batch = engine.generate(ids, n=n, temperature=1.0, max_new_tokens=max_new, seed=seed)
    return [prompts[i] for i in batch.prompt_index.tolist()], decode_responses(tokenizer, batch)


def true_score_stats(engine, tokenizer, task: SortTask, prompts: list[str], seed: int) -> dict:
    """Mean true score of one sampled completion per prompt (temperature 1), and its standard error."""
    ps, texts = _sample(engine, tokenizer, prompts, 1, seed, task.max_completion_tokens)
    s = torch.tensor([task.true_score(p, c) for p, c in zip(ps, texts)], dtype=torch.float64)
    return {"mean": s.mean().item(), "stderr": (s.std() / math.sqrt(len(s))).item(), "n": len(s),
            "example": f"{ps[0]} {texts[0]}"}


def collect_comparisons(engine, tokenizer, task: SortTask, prompts: list[str], seed: int) -> list[dict]:
    """Best-of-4 comparisons: 4 samples of the current policy per prompt; the simulated labeler picks one."""
    _, texts = _sample(engine, tokenizer, prompts, 4, seed, task.max_completion_tokens)
    rng = random.Random(seed)
    out = []
    for j, p in enumerate(prompts):
        group = texts[4 * j:4 * j + 4]
        out.append({"prompt": p, "completions": group, "best": task.label(p, group, rng)})
    return out


def labeler_ceiling(task: SortTask, comparisons: list[dict]) -> float:
    """Expected best-of-K accuracy of a perfect reward model (the true score, ties broken at random): the
    labeler picks at random among equally scored completions, so ties cap what any reward model can reach."""
    total = 0.0
    for c in comparisons:
        s = [task.true_score(c["prompt"], x) for x in c["completions"]]
        top = [i for i, v in enumerate(s) if v == max(s)]
        total += (c["best"] in top) / len(top)
    return total / len(comparisons)


def run_demo(cfg: DemoConfig, resume: bool = False) -> dict:
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: ~3 s start, not ~36 s
    run_dir = os.path.join(cfg.out, cfg.name)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(to_dict(cfg), f, indent=1)
    task = SortTask(cfg.min_len, cfg.max_len, cfg.labeler_temperature, cfg.demo_sorted_fraction)
    tokenizer = build_tokenizer(task.corpus())
    max_model_len = 2 * task.max_len + 4
    phases = {}

    # 1. SFT -------------------------------------------------------------------------------------------------
    sft_dir = os.path.join(run_dir, "sft_model")
    t0 = time.perf_counter()
    if resume and os.path.exists(os.path.join(sft_dir, "config.json")):
        from transformers import AutoModelForCausalLM
        policy = AutoModelForCausalLM.from_pretrained(sft_dir, dtype=torch.float32)
        _log(f"SFT model found in {sft_dir}; skipping SFT")
    else:
        config = tiny_llama_config(len(tokenizer), cfg.hidden_size, cfg.num_layers, cfg.intermediate_size,
                                   max_position_embeddings=max_model_len)
        policy = build_tiny_llama(config, seed=cfg.seed)
        n_params = sum(p.numel() for p in policy.parameters())
        _log(f"tiny Llama policy: {n_params / 1e6:.2f}M parameters, vocab {len(tokenizer)}; SFT on "
             f"{cfg.sft_examples} demonstrations")
        sft_cfg = dataclasses.replace(cfg.sft, out_dir=os.path.join(run_dir, "sft"), seed=cfg.seed)
        SFTTrainer(sft_cfg, policy, tokenizer, task.sft_examples(cfg.sft_examples, cfg.seed)).train()
        save_model(policy, tokenizer, sft_dir)
    phases["sft_seconds"] = time.perf_counter() - t0

    # 2. Engine (vLLM, HF fallback) ---------------------------------------------------------------------------
    t0 = time.perf_counter()
    engine = build_engine(cfg.engine, policy, tokenizer, sft_dir, max_model_len, seed=cfg.seed)
    _log(f"rollout engine: {type(engine).__name__} ({time.perf_counter() - t0:.1f} s to start)")
    phases["engine_start_seconds"] = time.perf_counter() - t0
    eval_prompts = task.prompts(cfg.eval_prompts, seed=cfg.seed + 1_000)
    before = true_score_stats(engine, tokenizer, task, eval_prompts, seed=cfg.seed + 7)
    _log(f"true score of the SFT policy: {before['mean']:.3f} +- {before['stderr']:.3f}  (e.g. {before['example']!r})")

    # 3. Comparisons + reward model ---------------------------------------------------------------------------
    rm_dir = os.path.join(run_dir, "reward_model")
    comp_path = os.path.join(run_dir, "comparisons.jsonl")
    t0 = time.perf_counter()
    comps = collect_comparisons(engine, tokenizer, task, task.prompts(cfg.comparisons, seed=cfg.seed + 2_000),
                                seed=cfg.seed + 3)
    write_jsonl(comp_path, comps)
    n_held = max(1, int(len(comps) * cfg.heldout_fraction))
    train_c, held_c = comps[n_held:], comps[:n_held]
    rm_cfg = dataclasses.replace(cfg.rm, out_dir=os.path.join(run_dir, "rm"), seed=cfg.seed)
    if resume and os.path.exists(os.path.join(rm_dir, "score_head.safetensors")):
        reward_model = RewardModel.from_pretrained(rm_dir)
        _log(f"reward model found in {rm_dir}; skipping RM training")
        rm_trainer = RewardTrainer(rm_cfg, reward_model, tokenizer, train_c, held_c)
    else:
        import copy
        reward_model = RewardModel.from_causal_lm(copy.deepcopy(policy))  # InstructGPT: RM from the SFT model
        _log(f"reward model: {len(train_c)} best-of-4 comparisons ({n_held} held out)")
        rm_trainer = RewardTrainer(rm_cfg, reward_model, tokenizer, train_c, held_c)
        rm_trainer.train()
        reward_model.save_pretrained(rm_dir, tokenizer)
    held = rm_trainer.evaluate()
    ceiling = labeler_ceiling(task, held_c)
    _log(f"reward model held-out accuracy (best of 4; chance 0.25, true-score ceiling {ceiling:.3f}): "
         f"{held['accuracy']:.3f}")
    phases["rm_seconds"] = time.perf_counter() - t0

    # 4. PPO -------------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    ppo_cfg = dataclasses.replace(cfg.ppo, out_dir=run_dir, seed=cfg.seed, max_new_tokens=task.max_completion_tokens,
                                  engine=cfg.engine)
    trainer = PPOTrainer(ppo_cfg, policy, tokenizer, task.prompts(4096, seed=cfg.seed + 3_000), engine,
                         reward_model=reward_model,
                         true_score_fn=lambda ps, cs: [task.true_score(p, c) for p, c in zip(ps, cs)])
    records = trainer.train(resume=resume)
    phases["ppo_seconds"] = time.perf_counter() - t0
    after = true_score_stats(engine, tokenizer, task, eval_prompts, seed=cfg.seed + 7)
    engine.close()
    save_model(policy, tokenizer, os.path.join(run_dir, "policy"))
    plot_metrics(records, ["score", "true_score", "kl", "kl_coef", "entropy", "value_loss"],
                 os.path.join(run_dir, "ppo.png"), title="PPO on the sorting task")

    stderr = math.sqrt(before["stderr"] ** 2 + after["stderr"] ** 2)
    summary = {
        "true_score_before": before["mean"], "true_score_after": after["mean"],
        "true_score_stderr": stderr, "true_score_stderr_before": before["stderr"],
        "true_score_stderr_after": after["stderr"], "eval_prompts": before["n"],
        "improvement_in_stderr": (after["mean"] - before["mean"]) / stderr if stderr > 0 else None,
        "kl_final": records[-1]["kl"] if records else None, "kl_target": ppo_cfg.kl_target,
        "kl_coef_final": records[-1]["kl_coef"] if records else None,
        "rm_heldout_accuracy": held["accuracy"], "rm_heldout_comparisons": held["count"],
        "rm_heldout_accuracy_ceiling": ceiling,
        "steps": len(records), "engine": type(engine).__name__,
        "example_before": before["example"], "example_after": after["example"],
        **{k: round(v, 2) for k, v in phases.items()},
        "seconds": time.perf_counter() - t_start,
    }
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def format_summary(s: dict, run_dir: str) -> str:
    return "\n".join([
        "",
        f"== rlhf-fast demo: {run_dir} ==",
        f"true score (labeler's programmatic score, {s['eval_prompts']} held-out prompts):",
        f"   before PPO {s['true_score_before']:.3f}  ->  after PPO {s['true_score_after']:.3f}   "
        f"(+{s['improvement_in_stderr']:.1f} standard errors; stderr of the difference {s['true_score_stderr']:.3f})",
        f"   e.g. before: {s['example_before']!r}   after: {s['example_after']!r}",
        f"final KL to the reference: {s['kl_final']:.3f} nats/sequence (controller target {s['kl_target']}; "
        f"beta {s['kl_coef_final']:.4f})",
        f"reward model held-out accuracy (best of 4, chance 0.25): {s['rm_heldout_accuracy']:.3f} "
        f"(a perfect RM would reach {s['rm_heldout_accuracy_ceiling']:.3f}: the labeler breaks score ties at random)",
        f"PPO steps: {s['steps']} with {s['engine']};  total time {s['seconds']:.0f} s "
        f"(SFT {s['sft_seconds']:.0f}, RM {s['rm_seconds']:.0f}, PPO {s['ppo_seconds']:.0f})",
        f"files: {run_dir}/summary.json, metrics.jsonl, ppo.png",
    ])
