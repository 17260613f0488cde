"""Dataclass configs, loadable from YAML and overridable from the command line, validated when built.

Precedence: dataclass defaults < YAML file < ``--key value`` overrides. Nested configs use dotted keys
(``--ppo.lr 1e-5``); ``--key=value`` works too; dashes in keys read as underscores. Unknown keys raise
:class:`ConfigError` naming the key.

Every field is declared with :func:`key`, which records a one-line help text and its constraints::

    lr: float = key(1e-3, "learning rate (AdamW)", gt=0)
    estimator: str = key("gae", "advantage estimator", choices=lambda: ESTIMATORS)   # a callable: read lazily

and every config checks all its fields (type, bounds ``ge``/``gt``/``le``/``lt``, ``choices``) in
``__post_init__``, then its cross-field rules (:meth:`Config.check`), so a config that exists is valid; a
violation is a :class:`ConfigError` naming the (dotted) key. ``rlhf-fast CMD --help`` lists the same
metadata (:func:`describe`).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from typing import Any, Callable, Iterable

import yaml

from rlhf_fast.checks import check_file


class ConfigError(ValueError):
    """A bad config value or key. ``key``: the dotted key (``None`` for a whole-file problem)."""

    def __init__(self, message: str, key: str | None = None):
        self.key, self.message = key, message
        super().__init__(f"config key {key!r} {message}" if key is not None else message)

    def under(self, prefix: str) -> "ConfigError":
        """The same error with its key inside the nested config ``prefix`` (``"ppo."``)."""
        return ConfigError(self.message, prefix + self.key) if self.key is not None and prefix else self


BOUNDS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
          "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def key(default: Any = dataclasses.MISSING, help: str = "", *, choices: Iterable | Callable[[], Iterable] | None = None,
        default_factory: Callable[[], Any] | None = None, **bounds: float):
    """A config field: ``default`` (or ``default_factory``), a one-line ``help``, optional ``choices`` (an
    iterable, or a callable returning one, called when checked) and bounds ``ge``/``gt``/``le``/``lt``
    (numbers; ``None`` always passes for ``X | None`` fields)."""
    unknown = set(bounds) - set(BOUNDS)
    if unknown:
        raise TypeError(f"key(): unknown bound(s) {sorted(unknown)}; use {sorted(BOUNDS)}")
    meta = {"help": help, "choices": choices, "bounds": bounds}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def choices_of(field: dataclasses.Field) -> tuple | None:
    c = field.metadata.get("choices")
    return tuple(c() if callable(c) else c) if c is not None else None


@functools.cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(cls) -> dict[str, Any]:
    hints = _hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _optional(typ) -> tuple[Any, bool]:
    """``X | None`` -> ``(X, True)``; anything else -> ``(typ, False)``."""
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(typ))
    return typ, False


def type_name(typ) -> str:
    base, optional = _optional(typ)
    name = base.__name__ if isinstance(base, type) else str(base)
    return f"{name} or none" if optional else name


def _is_instance(value, typ) -> bool:
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typ)


def check_field(field: dataclasses.Field, typ, value) -> None:
    """Raise :class:`ConfigError` (key = the field's name) unless ``value`` fits the field's type,
    bounds and choices."""
    base, optional = _optional(typ)
    if value is None and optional:
        return
    if not _is_instance(value, base):
        raise ConfigError(f"must be {type_name(typ)}, got {value!r}", field.name)
    if base is float and not math.isfinite(value):
        raise ConfigError(f"must be a finite number, got {value!r}", field.name)
    for name, bound in field.metadata.get("bounds", {}).items():
        op, ok = BOUNDS[name]
        if not ok(value, bound):
            raise ConfigError(f"must be {op} {bound}, got {value!r}", field.name)
    choices = choices_of(field)
    if choices is not None and value not in choices:
        raise ConfigError(f"must be one of {', '.join(map(str, choices))}; got {value!r}", field.name)


class Config:
    """Base of every config dataclass: all fields checked when an instance is built (also by
    ``dataclasses.replace``), then :meth:`check`."""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            check_field(f, hints[f.name], getattr(self, f.name))
        self.check()

    def check(self) -> None:
        """Cross-field rules; raise :class:`ConfigError` naming the key to change."""


def describe(cfg, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """``(dotted key, type, default, help)`` for every field of the config instance ``cfg`` (its values are
    shown as the defaults; nested configs flattened); the help ends with the field's bounds and choices."""
    rows = []
    for f in dataclasses.fields(cfg):
        typ, value = _hints(type(cfg))[f.name], getattr(cfg, f.name)
        if dataclasses.is_dataclass(typ):
            rows += describe(value, f"{prefix}{f.name}.")
            continue
        extra = [f"{BOUNDS[n][0]} {b}" for n, b in f.metadata.get("bounds", {}).items()]
        choices = choices_of(f)
        if choices is not None:
            extra.append("one of " + ", ".join(map(str, choices)))
        text = f.metadata.get("help", "") + (f" ({'; '.join(extra)})" if extra else "")
        shown = "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        rows.append((prefix + f.name, type_name(typ), shown, text))
    return rows


# -- loading ----------------------------------------------------------------------------------------
def _convert(value: Any, typ, key: str, current=None):
    """``value`` (from YAML or a CLI string) as ``typ`` (int, float, bool, str, Optional[...], dataclass);
    a nested dataclass is updated from ``current`` (its present value) rather than rebuilt from defaults."""
    base, optional = _optional(typ)
    if optional:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            return None
        return _convert(value, base, key)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"must be a mapping, got {value!r}", key)
        return from_dict(typ, value, prefix=f"{key}.", base=current)
    if isinstance(value, str) and typ is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"must be {typ.__name__}, got {value!r}", key) from None
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
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"must be {typ.__name__}, got {value!r}", key) from None
    return value


def from_dict(cls, data: dict, prefix: str = "", base=None):
    """``cls`` (or a copy of ``base``) updated from a (nested) dict; types converted, unknown keys rejected,
    the result validated."""
    base = base if base is not None else cls()
    fields = _fields(cls)
    kwargs = {}
    for k, value in data.items():
        name = str(k).replace("-", "_")
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {prefix + str(k)!r} for {cls.__name__}{hint}; "
                              f"the keys are listed by --help")
        kwargs[name] = _convert(value, fields[name], prefix + name, getattr(base, name))
    try:
        return dataclasses.replace(base, **kwargs)
    except ConfigError as err:
        raise err.under(prefix) from None


def _set_dotted(data: dict, dotted: str, value: str) -> None:
    parts = dotted.replace("-", "_").split(".")
    for part in parts[:-1]:
        data = data.setdefault(part, {})
        if not isinstance(data, dict):
            raise ConfigError(f"{dotted!r}: {part!r} is not a nested config")
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
            k, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg!r} has no value")
            k, value = arg[2:], args[i + 1]
            i += 2
        _set_dotted(out, k, value)
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls, path: str | None = None, overrides: list[str] | dict | None = None):
    """``cls`` from defaults, then the YAML file at ``path``, then ``overrides``; validated."""
    data: dict = {}
    if path:
        check_file("config", path)
        try:
            with open(path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"--config {path}: invalid YAML ({' '.join(str(err).split())})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {path}: the YAML config must be a mapping, got {type(loaded).__name__}")
        data = loaded
    if overrides:
        data = _merge(data, overrides if isinstance(overrides, dict) else parse_overrides(list(overrides)))
    return from_dict(cls, data)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# -- the trainers' configs --------------------------------------------------------------------------
def _estimators():
    from rlhf_fast.algos.advantages import ADVANTAGE_ESTIMATORS
    return tuple(ADVANTAGE_ESTIMATORS)


def _pack_choices():
    from rlhf_fast.models.packing import PACK_CHOICES
    return PACK_CHOICES


def _policy_losses():
    from rlhf_fast.algos.policy_losses import POLICY_LOSSES
    return tuple(POLICY_LOSSES)


def _loss_aggs():
    from rlhf_fast.ops.agg import SCALAR_AGG_MODES
    return SCALAR_AGG_MODES


def _kl_estimators():
    from rlhf_fast.ops.kl import ALIASES, ESTIMATORS
    return tuple(name + plus for name in ESTIMATORS + tuple(ALIASES) for plus in ("", "+"))


OVERLONG = ("reject", "truncate", "drop")
ENGINES = ("auto", "vllm", "hf")


@dataclasses.dataclass
class RunConfig(Config):
    """Fields every trainer shares."""
    out_dir: str = key("runs/run", "run directory: checkpoints/, metrics.jsonl and the final model")
    seed: int = key(0, "seed of data order, sampling and initialisation", ge=0)
    lr: float = key(1e-3, "learning rate (AdamW)", gt=0)
    batch_size: int = key(32, "examples per optimizer step", ge=1)
    max_grad_norm: float = key(1.0, "gradient-norm clip", gt=0)
    warmup_steps: int = key(0, "linear learning-rate warm-up steps", ge=0)
    log_every: int = key(1, "log metrics every N steps (0: never)", ge=0)
    save_every: int = key(0, "checkpoint every N steps (0: only at the end)", ge=0)
    keep_last: int = key(2, "complete checkpoints kept", ge=1)
    progress: bool = key(True, "show progress bars")
    overlong: str = key("reject", "an example longer than the model's context: reject (stop, naming the line), "
                        "truncate (cut to fit) or drop (skip it)", choices=OVERLONG)


@dataclasses.dataclass
class LoraSection(Config):
    """LoRA through peft (rlhf_fast.models.lora); the lm_head is never adapted (the fused lm_head path reads it)."""
    rank: int = key(0, "LoRA rank r (0: full fine-tuning)", ge=0)
    alpha: float | None = key(None, "LoRA alpha (scale alpha / r; default 2 * rank)", gt=0)
    targets: str = key("all-linear", "modules to adapt: all-linear (every linear layer but the lm_head, which is "
                       "never adapted) or comma-separated names (q_proj,v_proj)")
    dropout: float = key(0.0, "LoRA dropout", ge=0, lt=1)


@dataclasses.dataclass
class DataColumns(Config):
    """Source columns of the record fields (HF dataset directory, parquet or JSONL; rlhf_fast.data.sources)."""
    prompt: str = key("prompt", "column of the prompt (a string or chat messages)")
    completion: str = key("completion", "column of the SFT completion")
    chosen: str = key("chosen", "column of the preferred completion")
    rejected: str = key("rejected", "column of the rejected completion")
    split: str = key("train", "split of a saved DatasetDict directory")


def lora_key():
    """The ``lora`` field of a trainer config (``--lora-rank R --lora-alpha A --lora-targets ...``)."""
    return key(help="LoRA adapter (--lora-rank R --lora-alpha A --lora-targets ...)", default_factory=LoraSection)


def pack_key():
    """The ``pack_sequences`` field of a trainer whose policy scores token log-probs (sft, dpo, ppo)."""
    return key("auto", "run the policy's decoder padding-free (the real tokens as one sequence, same values): on, "
               "off, or auto (only under flash-attention, whose varlen kernels make it pay whatever the lengths)",
               choices=_pack_choices)


def columns_key():
    """The ``columns`` field of a trainer config (``--prompt-column ... --split ...``)."""
    return key(help="data column mapping (--prompt-column ...)", default_factory=DataColumns)


@dataclasses.dataclass
class SFTConfig(RunConfig):
    """Supervised fine-tuning on {"prompt", "completion"} examples."""
    model: str = key("", "local HF causal-LM directory to fine-tune")
    data: str = key("", "{\"prompt\", \"completion\"} examples: JSONL, a saved HF dataset directory or parquet")
    epochs: int = key(1, "passes over the data", ge=1)
    max_steps: int = key(0, "stop after N steps (0: epochs x batches)", ge=0)
    pack_sequences: str = pack_key()
    lora: LoraSection = lora_key()
    columns: DataColumns = columns_key()


@dataclasses.dataclass
class RewardConfig(RunConfig):
    """Reward-model training from pairwise or best-of-K comparisons."""
    model: str = key("", "local HF directory: a reward model, or a causal LM whose backbone gets a head")
    data: str = key("", "comparisons: JSONL pairwise {prompt, chosen, rejected[, margin]} or best-of-K "
                    "{prompt, completions, best}, or a saved HF dataset directory / parquet (pairwise; alias --comparisons)")
    eval_data: str | None = key(None, "comparisons held out for evaluation (same formats as data)")
    eval_fraction: float = key(0.1, "share of data held out when eval_data is not given", ge=0, lt=1)
    epochs: int = key(2, "passes over the data", ge=1)
    max_steps: int = key(0, "stop after N steps (0: epochs x batches)", ge=0)
    margin_scale: float = key(1.0, "pairwise loss -log sigmoid(r_c - r_r - margin_scale * margin)", ge=0)
    lora: LoraSection = lora_key()
    columns: DataColumns = columns_key()


@dataclasses.dataclass
class PPOConfig(RunConfig):
    """PPO (or GRPO / RLOO / REINFORCE++) against a reward model, with vLLM or HF rollouts."""
    model: str = key("", "local HF causal-LM directory: the SFT policy, also the frozen reference")
    reward_model: str | None = key(None, "local reward-model directory (same tokenizer as the policy)")
    prompts: str = key("", "{\"prompt\"} records: JSONL, a saved HF dataset directory or parquet")
    lr: float = key(1e-5, "policy learning rate (AdamW)", gt=0)
    critic_lr: float = key(1e-4, "critic (and online reward model) learning rate", gt=0)
    steps: int = key(20, "PPO iterations", ge=1)
    batch_size: int = key(32, "prompts per iteration", ge=1)
    samples_per_prompt: int = key(1, "completions per prompt (the group of grpo / rloo)", ge=1)
    max_new_tokens: int = key(32, "most tokens generated per completion", ge=1)
    temperature: float = key(1.0, "sampling temperature", gt=0)
    top_p: float = key(1.0, "nucleus sampling mass", gt=0, le=1)
    top_k: int = key(-1, "sample from the k most likely tokens (<= 0: off)", ge=-1)
    estimator: str = key("gae", "advantage estimator", choices=_estimators)
    critic: str = key("separate", "gae's critic: a separate model or a value head on the policy",
                      choices=("separate", "head"))
    init_value_from_reward: bool = key(True, "initialise the separate critic from the reward model")
    ppo_epochs: int = key(2, "passes over each iteration's rollouts", ge=1)
    minibatch_size: int = key(16, "rollouts per optimizer step", ge=1)
    grad_accum: int = key(1, "micro-batches per minibatch", ge=1)
    group_by_length: bool = key(True, "micro-batches of rows sorted by response length, each cut to its own longest "
                                "prompt and response (exact: every micro-batch is normalised by its minibatch)")
    pack_sequences: str = pack_key()
    clip_low: float = key(0.2, "ratio clip below: 1 - clip_low", ge=0, lt=1)
    clip_high: float = key(0.2, "ratio clip above: 1 + clip_high", ge=0)
    policy_loss: str = key("vanilla", "policy loss: vanilla (clipped PPO, token ratio) or gspo (sequence ratio)",
                           choices=_policy_losses)
    gspo_clip_low: float = key(3e-4, "gspo: sequence-ratio clip below, 1 - gspo_clip_low", ge=0, lt=1)
    gspo_clip_high: float = key(4e-4, "gspo: sequence-ratio clip above, 1 + gspo_clip_high", ge=0)
    dual_clip: float | None = key(None, "dual-clip constant c for negative advantages", gt=1)
    value_clip: float | None = key(0.2, "value-loss clip around the old values", gt=0)
    vf_coef: float = key(0.5, "value-loss weight", ge=0)
    entropy_coef: float = key(0.0, "entropy-bonus weight", ge=0)
    log_entropy: bool = key(True, "log the policy entropy even when entropy_coef = 0")
    loss_agg: str = key("token-mean", "how token losses are averaged", choices=_loss_aggs)
    gamma: float = key(1.0, "discount", ge=0, le=1)
    lam: float = key(0.95, "GAE lambda", ge=0, le=1)
    whiten_advantages: bool = key(True, "whiten gae / reinforce++ advantages")
    kl_coef: float = key(0.05, "KL penalty coefficient beta (the initial one when kl_target is set)", ge=0)
    kl_target: float | None = key(None, "target KL per sequence: adaptive beta (Ziegler et al.)", gt=0)
    kl_horizon: float = key(10000.0, "adaptive KL controller horizon", gt=0)
    kl_estimator: str = key("k1", "per-token KL estimator ('+': straight-through)", choices=_kl_estimators)
    reward_clip: float | None = key(None, "clip reward-model scores to [-c, c]", gt=0)
    tis_cap: float | None = key(None, "truncated importance-sampling cap against the engine's log-probs", gt=0)
    max_mismatch: float | None = key(0.5, "stop when mean |log pi_engine - log pi_learner| exceeds it (nats; "
                                     "none: off)", gt=0)
    ptx_coef: float = key(0.0, "PPO-ptx: weight of the LM loss on ptx_data", ge=0)
    ptx_data: str | None = key(None, "JSONL of {\"prompt\", \"completion\"} for PPO-ptx")
    engine: str = key("auto", "rollout engine (auto: vllm if importable)", choices=ENGINES)
    online_rm_every: int = key(0, "Ziegler online mode: retrain the reward model every N iterations (0: off)",
                               ge=0)
    online_comparisons: int = key(64, "online mode: new comparisons per round", ge=1)
    online_rm_steps: int = key(20, "online mode: reward-model steps per round", ge=1)
    dynamic_sampling: bool = key(False, "DAPO dynamic sampling (grpo / rloo): drop groups of equal rewards, "
                                 "sample more prompts to refill the batch")
    max_sampling_rounds: int = key(3, "dynamic sampling: most extra generation rounds per iteration", ge=1)
    lora: LoraSection = lora_key()
    columns: DataColumns = columns_key()

    @property
    def uses_ref(self) -> bool:
        """A KL term (fixed or adaptive): the run needs the frozen reference policy's log-probs."""
        return self.kl_coef > 0 or self.kl_target is not None

    def check(self) -> None:
        from rlhf_fast.algos.advantages import ADVANTAGE_ESTIMATORS
        group = ADVANTAGE_ESTIMATORS[self.estimator].min_group_size
        if self.samples_per_prompt < group:
            raise ConfigError(f"must be >= {group} for estimator {self.estimator!r} (a group per prompt), "
                              f"got {self.samples_per_prompt}", "samples_per_prompt")
        if self.policy_loss == "gspo" and self.dual_clip is not None:
            raise ConfigError("must be none with policy_loss 'gspo' (the dual clip is a token-ratio bound)",
                              "dual_clip")
        if self.grad_accum > self.minibatch_size:
            raise ConfigError(f"must be <= minibatch_size ({self.minibatch_size}), got {self.grad_accum}",
                              "grad_accum")
        if self.ptx_coef > 0 and not self.ptx_data:
            raise ConfigError(f"is needed when ptx_coef > 0 (got ptx_coef {self.ptx_coef})", "ptx_data")
        if self.dynamic_sampling and group < 2:
            grouped = ", ".join(n for n, e in ADVANTAGE_ESTIMATORS.items() if e.min_group_size >= 2)
            raise ConfigError(f"needs a group estimator ({grouped}), got estimator {self.estimator!r}",
                              "dynamic_sampling")
