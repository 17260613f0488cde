"""Dataclass configs, loadable from YAML and overridable from the command line.

Precedence: dataclass defaults < YAML file < ``--key value`` overrides. Nested configs use dotted keys
(``--ppo.lr 1e-5``); ``--key=value`` works too; dashes in keys read as underscores. Unknown keys raise
:class:`ConfigError` naming the key and the valid ones.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import yaml


class ConfigError(ValueError):
    pass


def _convert(value: Any, typ, key: str, current=None):
    """``value`` (from YAML or a CLI string) as ``typ`` (int, float, bool, str, Optional[...], dataclass);
    a nested dataclass is updated from ``current`` (its present value) rather than rebuilt from defaults."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            return None
        return _convert(value, args[0], key)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping, got {value!r}")
        return from_dict(typ, value, prefix=f"{key}.", base=current)
    if isinstance(value, str) and typ is not str:
        value = yaml.safe_load(value)
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            raise ValueError
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key {key!r} must be {typ.__name__}, got {value!r}") from None
    return value


def _fields(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def from_dict(cls, data: dict, prefix: str = "", base=None):
    """``cls`` (or a copy of ``base``) updated from a (nested) dict; types converted, unknown keys rejected."""
    base = base if base is not None else cls()
    fields = _fields(cls)
    kwargs = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise ConfigError(f"unknown config key {prefix + key!r} for {cls.__name__}; "
                              f"valid keys: {sorted(fields)}")
        kwargs[name] = _convert(value, fields[name], prefix + name, getattr(base, name))
    return dataclasses.replace(base, **kwargs)


def _set_dotted(data: dict, dotted: str, value: str) -> None:
    parts = dotted.replace("-", "_").split(".")
    for part in parts[:-1]:
        data = data.setdefault(part, {})
        if not isinstance(data, dict):
            raise ConfigError(f"config key {dotted!r}: {part!r} is not a nested config")
    data[parts[-1]] = value


def parse_overrides(args: list[str]) -> dict:
    """``["--a.b", "1", "--c=x"]`` -> ``{"a": {"b": "1"}, "c": "x"}`` (values stay strings)."""
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"expected an override --key value, got {arg!r}")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg!r} has no value")
            key, value = arg[2:], args[i + 1]
            i += 2
        _set_dotted(out, key, value)
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls, path: str | None = None, overrides: list[str] | dict | None = None):
    """``cls`` from defaults, then the YAML file at ``path``, then ``overrides``."""
    data: dict = {}
    if path:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the YAML config must be a mapping, got {type(loaded).__name__}")
        data = loaded
    if overrides:
        data = _merge(data, overrides if isinstance(overrides, dict) else parse_overrides(list(overrides)))
    return from_dict(cls, data)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


@dataclasses.dataclass
class RunConfig:
    """Fields every trainer shares."""
    out_dir: str = "runs/run"
    seed: int = 0
    lr: float = 1e-3
    batch_size: int = 32
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    log_every: int = 1
    save_every: int = 0            # checkpoint every N optimizer steps / iterations (0: only at the end)
    keep_last: int = 2             # checkpoints kept
    progress: bool = True          # tqdm bars


@dataclasses.dataclass
class SFTConfig(RunConfig):
    model: str = ""                # HF causal-LM directory
    data: str = ""                 # JSONL of {"prompt", "completion"}
    epochs: int = 1
    max_steps: int = 0             # 0: epochs * batches


@dataclasses.dataclass
class RewardConfig(RunConfig):
    model: str = ""                # HF directory: a reward model, or a causal LM whose backbone gets a head
    data: str = ""                 # JSONL comparisons (pairwise and/or best-of-K)
    eval_data: str | None = None
    eval_fraction: float = 0.1     # held out from `data` when eval_data is not given
    epochs: int = 2
    max_steps: int = 0
    margin_scale: float = 1.0      # pairwise loss -log sigmoid(r_c - r_r - margin_scale * margin)


@dataclasses.dataclass
class PPOConfig(RunConfig):
    model: str = ""                # SFT policy (HF causal-LM directory); also the frozen reference
    reward_model: str | None = None
    prompts: str = ""              # JSONL of {"prompt"}
    lr: float = 1e-5
    critic_lr: float = 1e-4
    steps: int = 20                # PPO iterations
    batch_size: int = 32           # prompts per iteration
    samples_per_prompt: int = 1    # n completions per prompt (groups for grpo / rloo)
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    estimator: str = "gae"         # gae | grpo | rloo | reinforce++
    critic: str = "separate"       # separate | head  (ignored by the critic-free estimators)
    init_value_from_reward: bool = True
    ppo_epochs: int = 2
    minibatch_size: int = 16
    grad_accum: int = 1            # micro-batches per minibatch
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    value_clip: float | None = 0.2
    vf_coef: float = 0.5
    entropy_coef: float = 0.0
    log_entropy: bool = True       # compute the policy entropy for the logs even when entropy_coef = 0
    loss_agg: str = "token-mean"
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    kl_coef: float = 0.05
    kl_target: float | None = None  # adaptive controller when set (KL per sequence)
    kl_horizon: float = 10000.0
    kl_estimator: str = "k1"
    reward_clip: float | None = None
    tis_cap: float | None = None   # truncated importance sampling against the rollout engine's log-probs
    ptx_coef: float = 0.0          # PPO-ptx: + ptx_coef * LM loss on `ptx_data`
    ptx_data: str | None = None
    engine: str = "auto"           # auto (vllm if importable) | vllm | hf
    online_rm_every: int = 0       # Ziegler online mode: every N iterations label new comparisons, retrain RM
    online_comparisons: int = 64
    online_rm_steps: int = 20
