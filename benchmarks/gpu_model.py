"""RESULTS.md's GPU step-time model section: :mod:`rlhf_fast.distributed.step_model` on the examples/ configs.

Rows: each launch config at a few device splits (W learner GPUs / E engines x tp), colocated or disaggregated,
sync or one-step async, on H100 (step also on H200), with the memory plan's peak per device beside it.
"""
from __future__ import annotations

import dataclasses
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
TITLE = "GPU step-time model (issue 12)"
# config -> (W, E, colocate, async): all 8 / 32 GPUs colocated, then disaggregated splits of the same GPUs
SPLITS = {"ppo_7b_1node.yaml": [(8, 8, True, False), (4, 4, False, False), (4, 4, False, True),
                                (6, 2, False, False), (6, 2, False, True)],
          "ppo_70b_4nodes.yaml": [(32, 4, True, False), (24, 1, False, False), (24, 1, False, True),
                                  (16, 2, False, False), (16, 2, False, True)]}


def example_config(name: str, **placement):
    """The examples/ launch config ``name`` (its model path made absolute) with ``placement`` overrides."""
    from rlhf_fast.distributed.config import DistributedPPOConfig
    from rlhf_fast.trainer.config import load_config
    cfg = load_config(DistributedPPOConfig, str(ROOT / "examples" / name))
    return dataclasses.replace(cfg, model=str(ROOT / cfg.model), **placement)


def _bound(t) -> str:
    if t.generation >= t.update:
        return "generation"
    return "update (FSDP2 comm)" if t.update_comm > t.update_compute else "update (compute)"


def _fits(peak_gib: float, hardware) -> str:
    fits = [hw.name for hw in hardware if peak_gib <= hw.memory_gib]
    return f"{peak_gib:.1f}" if len(fits) == len(hardware) else \
        f"{peak_gib:.1f} (fits {fits[0]} only)" if fits else f"{peak_gib:.1f} (fits neither)"


def model_row(name: str, W: int, E: int, colocate: bool, async_mode: bool) -> dict:
    """``line`` (the table row), ``label``, H100 ``step`` s and ``tokens_per_s``, ``fits`` (the plan fits an H100)."""
    from rlhf_fast.distributed.plan import GiB, config_plan
    from rlhf_fast.distributed.step_model import H100, H200, step_time, workload
    cfg = example_config(name, learners=W, engines=E, colocate=colocate, async_mode=async_mode)
    w = workload(cfg)
    t, t200 = step_time(w, H100), step_time(w, H200)
    peak = config_plan(cfg).peak_device / GiB
    placement, split, mode = ("colocated" if colocate else "disaggregated"), f"{W} / {E}×{w.tp}", \
        ("async" if async_mode else "sync")
    line = (f"| {cfg.model.rsplit('/', 1)[-1]} | {placement} | {w.gpus} | {split} | {mode} | {t.generation:.1f} | "
            f"{t.update:.1f} | {t.sync + t.sleep_wake:.2f} | **{t.step:.1f}** | {t.tokens_per_s:,.0f} | "
            f"{t200.step:.1f} | {_bound(t)} | {_fits(peak, (H100, H200))} |")
    return {"line": line, "label": f"{placement} {split} {mode}", "step": t.step, "tokens_per_s": t.tokens_per_s,
            "fits": peak <= H100.memory_gib}


def _best(name: str, rows: list[dict]) -> str:
    r = max((r for r in rows if r["fits"]), key=lambda r: r["tokens_per_s"])
    return f"{name}: {r['label']}, {r['step']:.1f} s per step, {r['tokens_per_s']:,.0f} tokens/s"


def section(level: str = "###") -> list[str]:
    """Markdown lines of the section (``level``: its heading's #s)."""
    from rlhf_fast.distributed.step_model import H100, H200
    head = ["| config | placement | GPUs | W / E×tp | mode | generation s | update s | sync (+ sleep/wake) s | "
            "step s | response tokens/s | step s on H200 | bound by | plan peak GiB per GPU |",
            "|---|---|--:|--:|---|--:|--:|--:|--:|--:|--:|---|--:|"]
    rows = {name: [model_row(name, *split) for split in splits] for name, splits in SPLITS.items()}
    best = "; ".join(_best(name, r) for name, r in rows.items())
    return [f"{level} {TITLE}", "",
            "**A model with named assumptions, not a measurement** (no GPU has run it): "
            "`rlhf_fast/distributed/step_model.py` (its docstring has every formula) on the `examples/` launch "
            "configs (7B gae: 256 rollouts × (1024 + 1024) tokens; 70B grpo: 512 × (2048 + 2048); one PPO epoch, "
            "activation checkpointing). Decode is memory-bound (weights + KV cache read per token step), prefill "
            "and training compute-bound, FSDP2 all-gather / reduce-scatter and the weight sync bandwidth-bound; "
            "async = one-step off-policy, generation of k+1 overlapping update k. Not modelled: reward-model "
            "scoring, the AdamW step, attention FLOPs, early-ending responses. Plan peak: the `--dry-run` memory "
            "plan (`rlhf_fast/distributed/plan.py`); a split whose peak exceeds the device is refused by the "
            "runtime's memory check, so its row is what it would take on a larger device.", "",
            f"- {H100.describe()}", f"- {H200.describe()}",
            f"- Fastest split that fits an H100 in the model: {best}.", "",
            *head, *(r["line"] for rs in rows.values() for r in rs), ""]
