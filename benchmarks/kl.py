"""Per-token KL penalty (forward + backward) and PPO reward shaping on ``[B, T]`` fp32 log-probs.

Cases ``B..xT..-k3-fwd+bwd``: the clamped k3 estimator (verl's ``low_var_kl``/``k3``, OpenRLHF's ``k3``,
both clamp the value to [-10, 10]) and its gradient wrt ``logp`` for a given upstream gradient.

- ``rlhf_fast``: ``kl_penalty(logp, ref, "k3", clamp=10)`` (one fused kernel forward, one backward).
- ``verl-eager``: verl 0.9.1's own ``kl_penalty(logp, ref, "low_var_kl")``.
- ``openrlhf-eager``: OpenRLHF 0.11.2's own ``compute_approx_kl(logp, ref, kl_estimator="k3")``.

Cases ``B..xT..-shape_rewards``: k1 KL, ``-kl_coef * KL`` on the response tokens and the score at each
row's last one.

- ``rlhf_fast``: ``shape_rewards(scores, logp, ref, mask, kl_coef)`` (one fused pass).
- ``verl-eager``: verl's own ``kl_penalty(.., "kl")`` then the arithmetic of its ``apply_kl_penalty``
  (``token_level_scores - beta * kld * response_mask``); the score tensor is built with one vectorised
  scatter (verl's reward managers fill it with a Python loop over samples, which is not timed here).
- ``openrlhf-eager``: OpenRLHF's own ``compute_approx_kl`` (masked as its experience maker does) then
  its own ``compute_reward``.

bytes_moved: fwd+bwd reads logp, ref and the upstream gradient and writes kl and the gradient (20 B per
token); shape_rewards reads logp, ref and the bool mask and writes rewards and kl (17 B per token).
"""
from __future__ import annotations

import importlib.util

import torch

from benchmarks.harness import Case

KL_COEF = 0.05


def _inputs(B: int, T: int, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    ref = -torch.rand(B, T, generator=g) * 3
    logp = ref + 0.3 * torch.randn(B, T, generator=g)
    lengths = torch.randint(T // 4, T + 1, (B, 1), generator=g)
    mask = torch.arange(T)[None, :] < lengths
    d = dict(logp=logp.requires_grad_(), ref=ref, grad=torch.randn(B, T, generator=g), scores=torch.randn(B, generator=g),
             mask=mask, mask_f=mask.float(), last=lengths - 1)
    return {k: v.to(device).detach().requires_grad_(v.requires_grad) for k, v in d.items()}


def _fwd_bwd(kl_fn):
    def run(inp):
        kl = kl_fn(inp["logp"], inp["ref"])
        return kl.detach(), torch.autograd.grad(kl, inp["logp"], inp["grad"])[0]
    return run


def _impls_fwd_bwd() -> dict:
    from rlhf_fast.ops import kl_penalty
    out = {"rlhf_fast": _fwd_bwd(lambda lp, ref: kl_penalty(lp, ref, "k3", clamp=10.0))}
    if importlib.util.find_spec("verl") is not None:
        from benchmarks._peers import verl_module
        verl_kl = verl_module().kl_penalty
        out["verl-eager"] = _fwd_bwd(lambda lp, ref: verl_kl(lp, ref, "low_var_kl"))
    if importlib.util.find_spec("openrlhf") is not None:
        from benchmarks._peers import openrlhf_module
        approx_kl = openrlhf_module("utils").compute_approx_kl
        out["openrlhf-eager"] = _fwd_bwd(lambda lp, ref: approx_kl(lp, ref, kl_estimator="k3"))
    return out


def _impls_shape_rewards() -> dict:
    from rlhf_fast.ops import shape_rewards
    out = {"rlhf_fast": lambda inp: shape_rewards(inp["scores"], inp["logp"].detach(), inp["ref"], inp["mask"],
                                                  KL_COEF)}
    if importlib.util.find_spec("verl") is not None:
        from benchmarks._peers import verl_module
        verl_kl = verl_module().kl_penalty

        @torch.no_grad()
        def verl(inp):
            token_level_scores = torch.zeros_like(inp["mask_f"]).scatter_(1, inp["last"], inp["scores"][:, None])
            kld = verl_kl(inp["logp"], inp["ref"], "kl") * inp["mask_f"]
            return token_level_scores - KL_COEF * kld, kld
        out["verl-eager"] = verl
    if importlib.util.find_spec("openrlhf") is not None:
        from benchmarks._peers import openrlhf_module
        utils = openrlhf_module("utils")

        @torch.no_grad()
        def openrlhf(inp):
            kl = utils.compute_approx_kl(inp["logp"], inp["ref"], kl_estimator="k1") * inp["mask_f"]
            return utils.compute_reward(inp["scores"], KL_COEF, kl, action_mask=inp["mask_f"]), kl
        out["openrlhf-eager"] = openrlhf
    return out


def cases(quick: bool, device: str) -> list[Case]:
    shapes = [(64, 1024), (256, 2048)] if quick else [(16, 256), (64, 1024), (256, 2048), (512, 4096)]
    out = []
    for B, T in shapes:
        make = lambda B=B, T=T: _inputs(B, T, device)  # noqa: E731
        common = dict(tokens=B * T, budget_s=1.0 if quick else 2.0, memory=not quick or B * T <= 2**16)
        out.append(Case(f"B{B}xT{T}-k3-fwd+bwd", make, _impls_fwd_bwd(), bytes_moved=20 * B * T, **common))
        out.append(Case(f"B{B}xT{T}-shape_rewards", make, _impls_shape_rewards(), bytes_moved=17 * B * T, **common))
    return out
