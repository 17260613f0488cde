"""Declarative config validation: every field of every config is checked when the config is built (type,
bounds, choices, cross-field rules), from Python, YAML and command-line overrides alike, and the error names
the (dotted) key."""
import dataclasses

import pytest

from rlhf_fast.trainer.config import (ConfigError, Config, PPOConfig, RewardConfig, RunConfig, SFTConfig, describe,
                                      key, load_config)
from rlhf_fast.trainer.demo import DemoConfig
from rlhf_fast.algos import ADVANTAGE_ESTIMATORS

CONFIGS = (RunConfig, SFTConfig, RewardConfig, PPOConfig, DemoConfig)


@pytest.mark.parametrize("cls", CONFIGS)
def test_every_field_has_help_and_defaults_are_valid(cls):
    cfg = cls()
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
    assert dataclasses.replace(cfg) == cfg


@pytest.mark.parametrize("override, key_name, message", [
    (["--steps", "-5"], "steps", "must be >= 1, got -5"),
    (["--batch-size", "0"], "batch_size", "must be >= 1, got 0"),
    (["--lr", "-1e-3"], "lr", "must be > 0, got -0.001"),
    (["--lr", "nan"], "lr", "must be a finite number"),
    (["--estimator", "ppo2"], "estimator", "must be one of " + ", ".join(ADVANTAGE_ESTIMATORS)),
    (["--critic", "shared"], "critic", "must be one of separate, head"),
    (["--loss-agg", "mean"], "loss_agg", "must be one of token-mean"),
    (["--kl-estimator", "k4"], "kl_estimator", "must be one of k1, k1+"),
    (["--top-p", "1.5"], "top_p", "must be <= 1, got 1.5"),
    (["--gamma", "-0.1"], "gamma", "must be >= 0"),
    (["--dual-clip", "0.5"], "dual_clip", "must be > 1"),
    (["--keep-last", "0"], "keep_last", "must be >= 1"),
    (["--overlong", "cut"], "overlong", "must be one of reject, truncate, drop"),
    (["--steps", "2.5"], "steps", "must be int, got 2.5"),
    (["--progress", "maybe"], "progress", "must be bool"),
    (["--estimator", "grpo"], "samples_per_prompt", "must be >= 2 for estimator 'grpo'"),
    (["--grad-accum", "32"], "grad_accum", "must be <= minibatch_size (16)"),
    (["--ptx-coef", "0.1"], "ptx_data", "is needed when ptx_coef > 0"),
])
def test_bad_ppo_values_name_the_key(override, key_name, message):
    with pytest.raises(ConfigError) as err:
        load_config(PPOConfig, None, override)
    assert err.value.key == key_name
    assert str(err.value).startswith(f"config key {key_name!r} ") and message in str(err.value)


def test_valid_values_pass_and_none_is_allowed_for_optional_fields():
    cfg = load_config(PPOConfig, None, ["--estimator", "grpo", "--samples-per-prompt", "4", "--kl-estimator", "k3+",
                                        "--dual-clip", "3", "--value-clip", "none", "--top-k", "-1"])
    assert (cfg.estimator, cfg.samples_per_prompt, cfg.kl_estimator, cfg.dual_clip, cfg.value_clip) == \
        ("grpo", 4, "k3+", 3.0, None)


def test_python_yaml_and_nested_configs_are_validated_too(tmp_path):
    with pytest.raises(ConfigError, match="config key 'lr' must be > 0"):
        SFTConfig(lr=0.0)
    with pytest.raises(ConfigError, match="config key 'epochs' must be int, got '3'"):
        SFTConfig(epochs="3")
    with pytest.raises(ConfigError, match="config key 'batch_size' must be >= 1"):
        dataclasses.replace(RewardConfig(), batch_size=0)
    yml = tmp_path / "c.yaml"
    yml.write_text("ppo:\n  steps: 0\n")
    with pytest.raises(ConfigError) as err:
        load_config(DemoConfig, str(yml))
    assert err.value.key == "ppo.steps"
    with pytest.raises(ConfigError) as err:
        load_config(DemoConfig, None, ["--max-len", "2"])
    assert err.value.key == "max_len" and "must be >= min_len (4)" in str(err.value)
    with pytest.raises(ConfigError, match=r"unknown config key 'ppo.stepz' for PPOConfig \(did you mean 'ppo.steps'"):
        load_config(DemoConfig, None, ["--ppo.stepz", "3"])


def test_adding_a_field_is_one_line_and_choices_may_be_callable():
    registry = ["a", "b"]

    @dataclasses.dataclass
    class Extra(Config):
        mode: str = key("a", "a mode", choices=lambda: registry)
        n: int = key(1, "a count", ge=1, le=3)

    registry.append("c")                 # the registry is read when a config is built, not when declared
    assert Extra(mode="c").mode == "c"
    with pytest.raises(ConfigError, match="config key 'n' must be <= 3, got 4"):
        Extra(n=4)
    assert describe(Extra()) == [("mode", "str", "a", "a mode (one of a, b, c)"),
                                 ("n", "int", "1", "a count (>= 1; <= 3)")]
    with pytest.raises(TypeError, match="unknown bound"):
        key(1, "x", min=0)
