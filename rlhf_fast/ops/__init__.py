"""Public functional ops. Each takes ``backend="auto" | "triton" | "native" | "torch"``."""
from rlhf_fast.ops.gae import gae
from rlhf_fast.ops.masked import masked_mean, masked_sum, masked_var, masked_whiten
from rlhf_fast.ops.logprob import logprobs_from_logits
from rlhf_fast.ops.linear_logprob import linear_logprobs
from rlhf_fast.ops.linear_ppo import linear_ppo_objective
from rlhf_fast.ops.kl import kl_penalty, shape_rewards
from rlhf_fast.ops.advantages import expand_to_tokens, grpo_advantages, reinforce_pp_returns, rloo_advantages
from rlhf_fast.ops.policy_loss import ppo_policy_loss
from rlhf_fast.ops.value_loss import ppo_value_loss
from rlhf_fast.ops.preference import preference_loss
