"""GAE advantages + returns on ``[B, T]`` fp32 rewards/values with right-padded responses (gamma 1, lam 0.95).

- ``rlhf_fast``: ``rlhf_fast.ops.gae`` with backend auto (C++/OpenMP on CPU, the Triton scan on CUDA).
- ``rlhf_fast-torch``: our torch reference (itself a loop over T), for scale.
- ``rlhf_fast-cuda``: the warp-scan CUDA kernel of csrc/cuda/gae.cu, when ``_C`` was built with CUDA.
- ``verl-loop``: verl 0.9.1's own ``compute_gae_advantage_return`` (a Python loop over T).
- ``openrlhf-loop``: OpenRLHF 0.11.2's own ``get_advantages_and_returns`` (a Python loop over T), taken from
  its installed source by ``tests/peers`` since its module cannot import without Ray/DeepSpeed.

The peers are the installed packages (requirements/peers-nodeps.txt); when absent their rows are left out.
``bytes_moved``: read rewards and values (fp32) and the bool mask, write advantages and returns (fp32):
17 bytes per token, once each.
"""
from __future__ import annotations

import importlib.util

import torch

from benchmarks.harness import Case

BYTES_PER_TOKEN = 4 + 4 + 1 + 4 + 4
GAMMA, LAM = 1.0, 0.95


def _inputs(B: int, T: int, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(T // 4, T + 1, (B, 1), generator=g)
    mask = torch.arange(T)[None, :] < lengths
    return dict(rewards=torch.randn(B, T, generator=g).to(device), values=torch.randn(B, T, generator=g).to(device),
                mask=mask.to(device), mask_f=mask.float().to(device))


def _ours(backend: str):
    from rlhf_fast.ops import gae
    return lambda inp: gae(inp["rewards"], inp["values"], inp["mask"], GAMMA, LAM, backend=backend)


def _ours_cuda(inp):
    from rlhf_fast._backend import native_module
    return native_module().gae_forward_cuda(inp["rewards"], inp["values"], inp["mask"], GAMMA, LAM)


def _peers() -> dict:
    out = {}
    if importlib.util.find_spec("verl") is not None:
        from benchmarks._peers import verl_module
        verl_gae = verl_module().compute_gae_advantage_return
        out["verl-loop"] = lambda inp: verl_gae(inp["rewards"], inp["values"], inp["mask_f"], GAMMA, LAM)
    if importlib.util.find_spec("openrlhf") is not None:
        from benchmarks._peers import source_function
        orl_gae = source_function("openrlhf", "trainer/ppo_utils/experience_maker.py",
                                  "RemoteExperienceMaker.get_advantages_and_returns")
        out["openrlhf-loop"] = lambda inp: orl_gae(None, inp["values"], inp["rewards"], inp["mask_f"], GAMMA, LAM)
    if not out:
        print("gae: verl / openrlhf not installed (requirements/peers-nodeps.txt); peer rows left out")
    return out


def cases(quick: bool, device: str) -> list[Case]:
    from rlhf_fast._backend import native_module
    shapes = [(64, 1024), (256, 2048)] if quick else [(16, 256), (64, 1024), (256, 2048), (512, 4096)]
    impls = {"rlhf_fast": _ours("auto"), "rlhf_fast-torch": _ours("torch")}
    if device == "cuda" and hasattr(native_module() or object(), "gae_forward_cuda"):
        impls["rlhf_fast-cuda"] = _ours_cuda
    impls.update(_peers())
    return [Case(name=f"B{B}xT{T}", make_inputs=lambda B=B, T=T: _inputs(B, T, device), impls=impls,
                 bytes_moved=BYTES_PER_TOKEN * B * T, tokens=B * T, budget_s=1.0 if quick else 2.0,
                 memory=not quick or B * T <= 2**16)
            for B, T in shapes]
