"""Models: tiny Llama builder, value head / critic, reward model, policy log-probs (fused lm_head)."""
from rlhf_fast.models.policy_logprobs import policy_logprobs
from rlhf_fast.models.reward_model import RewardModel
from rlhf_fast.models.tiny import build_tiny_llama, save_model, tiny_llama_config
from rlhf_fast.models.value_model import ScalarHeadModel, ValueModel

__all__ = ["RewardModel", "ScalarHeadModel", "ValueModel", "build_tiny_llama", "policy_logprobs", "save_model",
           "tiny_llama_config"]
