"""Trainers (SFT, reward model, PPO and its critic-free cousins), configs, checkpoints, the demo pipeline.

The names below are imported on first use (PEP 562), so ``rlhf_fast.trainer.config`` alone (what the CLI
validates a config with) does not import the trainers, models and rollout engines.
"""
import importlib

_EXPORTS = {"NonFiniteLossError": "base", "ConfigError": "config", "PPOConfig": "config", "RewardConfig": "config",
            "SFTConfig": "config", "load_config": "config", "AdaptiveKLController": "kl_controller",
            "FixedKLController": "kl_controller", "PPOTrainer": "ppo", "RewardTrainer": "reward",
            "SFTTrainer": "sft"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"rlhf_fast.trainer.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
