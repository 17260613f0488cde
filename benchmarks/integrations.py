"""The peers' own trainers and functions as they are vs with the one-line ``rlhf_fast.integrations`` enabled.

- ``trl-grpo M50xP64xN128-accum{8,1}``: TRL 1.16's ``GRPOTrainer.train()`` for one step on the ``ppo_step``
  setup (benchmarks/ppo_step.py: ~52M Llama, 32,000 vocabulary, 64 rollouts x 128 tokens, HF generate,
  fp32, CPU), its 64 rollouts in 8 micro-batches (``gradient_accumulation_steps=8``) or in 1. ``trl`` is TRL as
  is; ``rlhf_fast-trl`` the same trainer with ``rlhf_fast.integrations.trl.enabled()`` around the step (TRL's
  fused lm_head log-prob/entropy on ``rlhf_fast.ops.linear_logprobs``). ``peak_mb``: the whole process's peak
  resident memory during one step after a warm-up step, each impl in a fresh process.
- ``verl-gae``, ``verl-policy_loss``: verl 0.9.1's ``core_algos.compute_gae_advantage_return`` and its
  registered ``vanilla`` policy loss (forward + backward), as verl looks them up, without and with
  ``rlhf_fast.integrations.verl`` (``gae`` -> the fused GAE; ``rlhf_fast_vanilla``), on the ``gae`` / ``losses``
  benches' inputs.
- ``openrlhf-gae``, ``openrlhf-losses``: OpenRLHF 0.11.2's experience-maker GAE (taken from its source: the
  module needs Ray) and ``PolicyLoss`` + ``ValueLoss`` forward + backward, without and with
  ``rlhf_fast.integrations.openrlhf``.
Integrated functions are resolved once per case (enable, look the name up as the peer does, disable), so the
timings hold only the calls. The peers come from tests/peers (benchmarks/_peers.py); absent peers: rows left out.
"""
from __future__ import annotations

import importlib.util

import torch

from benchmarks import gae as gae_bench
from benchmarks import losses as losses_bench
from benchmarks import ppo_step
from benchmarks.harness import Case, lazy_impl

GAMMA, LAM = gae_bench.GAMMA, gae_bench.LAM


def _trl_step(integrated: bool):
    def step(state: dict) -> None:
        if not integrated:
            state["trainer"].train()
            return
        from rlhf_fast.integrations import trl as fast
        with fast.enabled():
            state["trainer"].train()
    return step


def _trl_cases(quick: bool) -> list[Case]:
    out = []
    for micro in (ppo_step.MICRO_BATCHES, 1):
        impls = {impl: lazy_impl(impl, lambda micro=micro: ppo_step._trl_inputs(micro, eos=False), _trl_step(on))
                 for impl, on in (("trl", False), ("rlhf_fast-trl", True))}
        name = f"trl-grpo M50xP{ppo_step.PROMPTS * ppo_step.SAMPLES}xN{ppo_step.NEW_TOKENS}-accum{micro}"
        out.append(Case(name=name, make_inputs=dict, impls=impls,
                        tokens=ppo_step.PROMPTS * ppo_step.SAMPLES * ppo_step.NEW_TOKENS,
                        min_reps=1 if quick else 2, budget_s=0.0, memory_scope="process",
                        size_label="generated tokens"))
    return out


def _integrated(module: str, lookup):
    """``lookup()`` evaluated with ``rlhf_fast.integrations.<module>`` enabled (the object the peer would call)."""
    integration = importlib.import_module(f"rlhf_fast.integrations.{module}")
    with integration.enabled():
        return lookup()


def _verl_cases(shapes, device) -> list[Case]:
    from omegaconf import OmegaConf
    from benchmarks._peers import verl_module
    core = verl_module()
    config = OmegaConf.create(dict(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.2, clip_ratio_c=3.0,
                                   global_batch_info={}))
    gae_fns = {"verl": core.compute_gae_advantage_return,
               "rlhf_fast-verl": _integrated("verl", lambda: core.compute_gae_advantage_return)}
    loss_fns = {"verl": core.get_policy_loss_fn("vanilla"),
                "rlhf_fast-verl": _integrated("verl", lambda: core.get_policy_loss_fn("rlhf_fast_vanilla"))}

    def gae(fn):
        return lambda inp: fn(inp["rewards"], inp["values"], inp["mask_f"], GAMMA, LAM)

    def policy_loss(fn):
        def run(inp):
            loss, _ = fn(inp["old_logp"], inp["logp"], inp["advantages"], inp["mask_f"], "token-mean", config)
            return torch.autograd.grad(loss, inp["logp"])
        return run
    out = []
    for B, T in shapes:
        out.append(Case(name=f"verl-gae B{B}xT{T}", make_inputs=lambda B=B, T=T: gae_bench._inputs(B, T, device),
                        impls={k: gae(f) for k, f in gae_fns.items()}, tokens=B * T, budget_s=1.0, memory=False))
        out.append(Case(name=f"verl-policy_loss B{B}xT{T}",
                        make_inputs=lambda B=B, T=T: losses_bench._inputs(B, T, device),
                        impls={k: policy_loss(f) for k, f in loss_fns.items()}, tokens=B * T, budget_s=1.0,
                        memory=False))
    return out


def _openrlhf_cases(shapes, device) -> list[Case]:
    from benchmarks._peers import openrlhf_module, source_function
    loss = openrlhf_module("loss")
    openrlhf_module("utils")
    from rlhf_fast.integrations.openrlhf import gae_method
    gae_fns = {"openrlhf": source_function("openrlhf", "trainer/ppo_utils/experience_maker.py",
                                           "RemoteExperienceMaker.get_advantages_and_returns"),
               "rlhf_fast-openrlhf": gae_method}
    classes = {"openrlhf": (loss.PolicyLoss, loss.ValueLoss),
               "rlhf_fast-openrlhf": _integrated("openrlhf", lambda: (loss.PolicyLoss, loss.ValueLoss))}

    def gae(fn):
        return lambda inp: fn(None, inp["values"], inp["rewards"], inp["mask_f"], GAMMA, LAM)

    def losses(policy_cls, value_cls):
        policy, value = policy_cls(0.2, 0.2, dual_clip=3.0), value_cls(0.2)

        def run(inp):
            pl = policy(inp["logp"], inp["old_logp"], inp["advantages"], inp["mask_f"])[0]
            vl = value(inp["values"], inp["old_values"], inp["returns"], inp["mask_f"])
            return losses_bench._backward(inp, pl, vl)
        return run
    out = []
    for B, T in shapes:
        out.append(Case(name=f"openrlhf-gae B{B}xT{T}", make_inputs=lambda B=B, T=T: gae_bench._inputs(B, T, device),
                        impls={k: gae(f) for k, f in gae_fns.items()}, tokens=B * T, budget_s=1.0, memory=False))
        out.append(Case(name=f"openrlhf-losses B{B}xT{T}",
                        make_inputs=lambda B=B, T=T: losses_bench._inputs(B, T, device),
                        impls={k: losses(*c) for k, c in classes.items()}, tokens=B * T, budget_s=1.0,
                        memory=False))
    return out


def cases(quick: bool, device: str) -> list[Case]:
    shapes = [(64, 1024)] if quick else [(64, 1024), (256, 2048)]
    out = []
    if importlib.util.find_spec("verl") is not None:
        out += _verl_cases(shapes, device)
    if importlib.util.find_spec("openrlhf") is not None:
        out += _openrlhf_cases(shapes, device)
    if importlib.util.find_spec("trl") is not None and device == "cpu":
        out += _trl_cases(quick)
    return out
