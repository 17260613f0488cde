"""Train/inference mismatch between the rollout engine's and the learner's log-probs.

For response tokens y_t sampled from the engine's policy μ (``rollout_logprobs = log μ``) and the
learner's log-probs of the same tokens under the same weights (``learner_logprobs = log π``)::

    Δ_t = log π(y_t) - log μ(y_t)            w_t = exp(Δ_t)   (per-token importance weight π/μ)
    abs_diff_mean = mean_t |Δ_t|             abs_diff_max = max_t |Δ_t|
    kl_k3         = mean_t (w_t - 1 - Δ_t)   (k3 estimator of KL(μ || π), ≥ 0, unbiased under y ~ μ)
    capped_frac   = mean_t [w_t > tis_cap]   (tokens whose truncated-IS weight min(w, tis_cap) is capped)

Means are over tokens where ``mask`` is set (all of them together, not per row). In exact arithmetic
with synced weights every Δ_t is 0; what remains is numerical (kernels, dtypes, batching).
Use it to log the mismatch; the correction itself is ``rlhf_fast.ops.ppo_policy_loss(tis_cap=...)``.
``learner_logprobs(model, batch)`` gives log π of a RolloutBatch's response tokens (the learner side).
"""
from __future__ import annotations

import torch

from rlhf_fast._validation import check_mask, check_same_shape, check_tensor
from rlhf_fast.rollout.batch import RolloutBatch
from rlhf_fast.ops.kl import kl_value_torch


def logprob_mismatch(rollout_logprobs: torch.Tensor, learner_logprobs: torch.Tensor, mask,
                     tis_cap: float = 2.0) -> dict[str, float]:
    """Metrics above as Python floats: abs_diff_mean, abs_diff_max, kl_k3, capped_frac, tokens.

    rollout_logprobs, learner_logprobs: float [B, T]; mask: bool or {0,1} [B, T]. With no masked-in
    token every metric is 0.
    """
    check_tensor("rollout_logprobs", rollout_logprobs, floating=True, ndim=2)
    check_tensor("learner_logprobs", learner_logprobs, floating=True, ndim=2)
    check_same_shape("learner_logprobs", learner_logprobs, "rollout_logprobs", rollout_logprobs)
    mask = check_mask("mask", mask, rollout_logprobs.shape)
    if not isinstance(tis_cap, (int, float)) or tis_cap <= 0:
        raise ValueError(f"tis_cap must be a positive number, got {tis_cap!r}")
    # float64: k3 ~ Δ²/2 vanishes in fp32 for the ~1e-6 differences of synced fp32 engines
    delta = learner_logprobs.detach().double() - rollout_logprobs.detach().double().to(learner_logprobs.device)
    delta = delta[mask.to(delta.device)]
    n = delta.numel()
    if n == 0:
        return {"abs_diff_mean": 0.0, "abs_diff_max": 0.0, "kl_k3": 0.0, "capped_frac": 0.0, "tokens": 0}
    w = delta.exp()
    return {
        "abs_diff_mean": delta.abs().mean().item(),
        "abs_diff_max": delta.abs().max().item(),
        "kl_k3": kl_value_torch(-delta, "k3").mean().item(),   # expm1(delta) - delta
        "capped_frac": (w > tis_cap).float().mean().item(),
        "tokens": n,
    }


@torch.no_grad()
def learner_logprobs(model: torch.nn.Module, batch: RolloutBatch) -> torch.Tensor:
    """log π(y_t) [B, R] fp32 of ``batch``'s response tokens under ``model`` (``policy_logprobs``, eval mode,
    on the model's device; 0 outside ``response_mask``), returned on the CPU."""
    from rlhf_fast.models.policy_logprobs import policy_logprobs
    device = next(model.parameters()).device
    b = batch.to(device)
    P = b.prompt_ids.shape[1]
    response_mask = torch.cat([torch.zeros_like(b.prompt_ids, dtype=torch.bool), b.response_mask], dim=1)
    was_training = model.training
    model.eval()
    try:
        logp = policy_logprobs(model, b.input_ids, b.attention_mask, response_mask)
    finally:
        model.train(was_training)
    return logp[:, P:].float().cpu()
