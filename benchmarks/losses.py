"""PPO policy + value loss, forward AND backward together (one training micro-step's loss work).

Each impl computes the clipped policy loss (clip 0.2, dual clip 3, token-mean) and the clipped value loss
(clip 0.2, token-mean) on ``[B, T]`` fp32 inputs, then the gradients w.r.t. logp and values:

- ``rlhf_fast``: ``ppo_policy_loss`` + ``ppo_value_loss`` (fused forward kernel + fused backward kernel each).
- ``verl-eager``: verl 0.9.1's own ``compute_policy_loss_vanilla`` + ``compute_value_loss`` (``agg_loss`` inside).
- ``openrlhf-eager``: OpenRLHF 0.11.2's own ``PolicyLoss`` + ``ValueLoss`` modules.

The peers are the installed packages (requirements/peers-nodeps.txt), imported without their ray/deepspeed
stacks by ``tests/peers/__init__.py``; when they are not installed, their rows are left out.
``bytes_moved`` = the minimum: read the 6 fp32 inputs and the bool mask once, write the 2 fp32 gradients
(33 bytes per token). Ours reads the inputs twice (forward, then backward), 59 bytes per token.
"""
from __future__ import annotations

import importlib.util
import pathlib
import sys

import torch

from benchmarks.harness import Case

BYTES_PER_TOKEN = 6 * 4 + 1 + 2 * 4


def _inputs(B: int, T: int, device: str) -> dict:
    g = torch.Generator().manual_seed(0)

    def randn(scale=1.0, shift=0.0):
        return (shift + scale * torch.randn(B, T, generator=g)).to(device)

    old_logp = -torch.rand(B, T, generator=g).to(device) * 3
    old_values = randn()
    lengths = torch.randint(T // 4, T + 1, (B, 1), generator=g)
    mask = (torch.arange(T)[None, :] < lengths).to(device)  # right-padded responses
    return dict(logp=(old_logp + randn(0.2)).requires_grad_(), old_logp=old_logp, advantages=randn(),
                values=(old_values + randn(0.3)).requires_grad_(), old_values=old_values,
                returns=randn(shift=1.0), mask=mask, mask_f=mask.float())


def _backward(inp, policy_loss, value_loss):
    return torch.autograd.grad(policy_loss + value_loss, [inp["logp"], inp["values"]])


def _ours(inp):
    from rlhf_fast.ops import ppo_policy_loss, ppo_value_loss
    pl, _ = ppo_policy_loss(inp["logp"], inp["old_logp"], inp["advantages"], inp["mask"], dual_clip=3.0)
    vl, _ = ppo_value_loss(inp["values"], inp["old_values"], inp["returns"], inp["mask"], clip=0.2)
    return _backward(inp, pl, vl)


def _peer_loader():
    """tests/peers (as pytest imports it: ``tests/`` on sys.path; the verl wheel ships a top-level ``tests``)."""
    tests_dir = str(pathlib.Path(__file__).resolve().parents[1] / "tests")
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    import peers
    return peers


def _verl():
    from omegaconf import OmegaConf

    core = _peer_loader().verl_module()
    config = OmegaConf.create(dict(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.2, clip_ratio_c=3.0,
                                   global_batch_info={}))

    def run(inp):
        pl, _ = core.compute_policy_loss_vanilla(inp["old_logp"], inp["logp"], inp["advantages"], inp["mask_f"],
                                                 "token-mean", config)
        vl, _ = core.compute_value_loss(inp["values"], inp["returns"], inp["old_values"], inp["mask_f"], 0.2,
                                        "token-mean")
        return _backward(inp, pl, vl)
    return run


def _openrlhf():
    loss = _peer_loader().openrlhf_module("loss")
    policy, value = loss.PolicyLoss(0.2, 0.2, dual_clip=3.0), loss.ValueLoss(0.2)

    def run(inp):
        pl = policy(inp["logp"], inp["old_logp"], inp["advantages"], inp["mask_f"])[0]
        vl = value(inp["values"], inp["old_values"], inp["returns"], inp["mask_f"])
        return _backward(inp, pl, vl)
    return run


def _peers() -> dict:
    out = {}
    if importlib.util.find_spec("verl") is not None:
        out["verl-eager"] = _verl()
    if importlib.util.find_spec("openrlhf") is not None:
        out["openrlhf-eager"] = _openrlhf()
    if not out:
        print("losses: verl / openrlhf not installed (requirements/peers-nodeps.txt); peer rows left out")
    return out


def cases(quick: bool, device: str) -> list[Case]:
    shapes = [(64, 1024), (256, 2048)] if quick else [(16, 256), (64, 1024), (256, 2048), (512, 4096)]
    impls = {"rlhf_fast": _ours, **_peers()}
    return [Case(name=f"B{B}xT{T}", make_inputs=lambda B=B, T=T: _inputs(B, T, device), impls=impls,
                 bytes_moved=BYTES_PER_TOKEN * B * T, tokens=B * T, budget_s=1.0 if quick else 2.0,
                 memory=not quick or B * T <= 2**16)
            for B, T in shapes]
