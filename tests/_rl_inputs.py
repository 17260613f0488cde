"""Inputs shared by the RL-math tests (gae, kl, masked, advantages)."""
import torch


def awkward_mask(B: int, T: int) -> torch.Tensor:
    """``[B, T]`` bool cycling through: right-padded, left-padded, random gaps, fully masked, all valid,
    a single valid token (B >= 6 covers every kind)."""
    m = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        kind, n = b % 6, int(torch.randint(1, T + 1, ()))
        if kind == 0:
            m[b, :n] = True
        elif kind == 1:
            m[b, T - n:] = True
        elif kind == 2:
            m[b] = torch.rand(T) < 0.6
        elif kind == 4:
            m[b] = True
        elif kind == 5:
            m[b, int(torch.randint(0, T, ()))] = True
    return m


def device_for(backend: str) -> str:
    """Where a backend's inputs live: Triton on the GPU when there is one (else the interpreter), others on CPU."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
