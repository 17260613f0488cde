"""Generalized Advantage Estimation (Schulman et al. 2016), mask-aware.

For each row, sweeping t = T-1 .. 0 over the valid positions (mask[t] true)::

    delta_t = r_t + gamma * V_next - V_t          V_next: value at the next valid position, 0 past the end
    A_t     = delta_t + gamma * lam * A_next      A_next: advantage at the next valid position, 0 past the end
    R_t     = A_t + V_t

Masked positions output A_t = R_t = 0 and carry (V_next, A_next) through unchanged, so left padding,
right padding and gaps (e.g. tool-output tokens) all work. Inputs [B, T] in any float dtype;
outputs fp32 [B, T]. No gradient flows (advantages and returns are targets).

Backends: torch (the loop above), native on CPU (csrc/gae.cpp) and on CUDA (csrc/cuda/gae.cu: one warp per
row, both recursions as warp scans; what auto picks on CUDA tensors when ``_C`` is built with CUDA), triton
(kernels/gae.py: tiles of rows, associative scans; auto's choice on CUDA otherwise).
"""
from __future__ import annotations

import torch

from rlhf_fast._backend import native_module, resolve_backend
from rlhf_fast._validation import check_in_range, check_mask, check_same_device, check_same_shape, check_tensor


def gae_torch(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float,
              dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: the recursion above as a loop over T, computed in ``dtype``."""
    r, v, m = rewards.to(dtype), values.to(dtype), mask.bool()
    B, T = r.shape
    advantages = torch.zeros(B, T, dtype=dtype, device=r.device)
    next_value = torch.zeros(B, dtype=dtype, device=r.device)
    last = torch.zeros(B, dtype=dtype, device=r.device)
    for t in reversed(range(T)):
        valid = m[:, t]
        step = r[:, t] + gamma * next_value - v[:, t] + gamma * lam * last
        last = torch.where(valid, step, last)
        next_value = torch.where(valid, v[:, t], next_value)
        advantages[:, t] = torch.where(valid, last, 0.0)
    returns = torch.where(m, advantages + v, 0.0)
    return advantages, returns


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95,
        backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and returns, ``[B, T]`` fp32 each. See the module docstring for the math."""
    check_tensor("rewards", rewards, floating=True, ndim=2)
    check_tensor("values", values, floating=True)
    check_same_shape("values", values, "rewards", rewards)
    mask = check_mask("mask", mask, rewards.shape)
    check_same_device({"rewards": rewards, "values": values, "mask": mask})
    gamma = check_in_range("gamma", gamma, 0.0, 1.0)
    lam = check_in_range("lam", lam, 0.0, 1.0)
    backend = resolve_backend(backend, rewards, native_cuda="gae_forward_cuda")
    if backend == "native":
        native = native_module()
        return (native.gae_forward_cuda if rewards.is_cuda else native.gae_forward)(rewards, values, mask, gamma, lam)
    if backend == "triton":
        from rlhf_fast.kernels.gae import gae_triton
        return gae_triton(rewards, values, mask, gamma, lam)
    return gae_torch(rewards, values, mask, gamma, lam)
