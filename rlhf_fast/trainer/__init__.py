"""Trainers (SFT, reward model, PPO and its critic-free cousins), configs, checkpoints, the demo pipeline."""
from rlhf_fast.trainer.base import NonFiniteLossError
from rlhf_fast.trainer.config import ConfigError, PPOConfig, RewardConfig, SFTConfig, load_config
from rlhf_fast.trainer.kl_controller import AdaptiveKLController, FixedKLController
from rlhf_fast.trainer.ppo import PPOTrainer
from rlhf_fast.trainer.reward import RewardTrainer
from rlhf_fast.trainer.sft import SFTTrainer

__all__ = ["AdaptiveKLController", "ConfigError", "FixedKLController", "NonFiniteLossError", "PPOConfig",
           "PPOTrainer", "RewardConfig", "RewardTrainer", "SFTConfig", "SFTTrainer", "load_config"]
