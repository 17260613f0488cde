"""Masked reductions over the valid tokens of a ``[B, T]`` batch, with GLOBAL statistics (as TRL and verl).

With ``m`` the mask, ``n = sum(m)`` and sums over every valid position of the whole tensor::

    masked_sum(x, m)            = sum(x * m)
    masked_mean(x, m)           = sum(x * m) / n                                  0 when n == 0
    masked_var(x, m, unbiased)  = sum(m * (x - mean)^2) / (n - 1 if unbiased else n)
                                                                                  0 when that divisor is <= 0
    masked_whiten(x, m)         = (x - mean) * rsqrt(var_unbiased + eps) [+ mean if not shift_mean]
                                  at valid positions, 0 at masked positions

``dim`` (sum/mean only) reduces along that dimension instead of globally (plain torch ops on every backend). Everything accumulates and
returns in fp32 whatever the input dtype. Degenerate counts give 0 instead of NaN or an exception (TRL
raises on an all-masked batch; that needs a device sync, which we avoid). Masked positions of whiten
are 0, not the input value: they are padding and must not feed a loss.

All four are differentiable. Backends: ``torch`` is the reference (plain autograd); ``native`` and
``triton`` compute the global statistics in one fused pass (per-row count/mean/M2, merged with Chan's
formula) and whiten in a second, inside an autograd Function with a closed-form backward.
"""
from __future__ import annotations

import torch

from rlhf_fast._backend import native_module, resolve_backend
from rlhf_fast._validation import check_mask, check_tensor


def _checked(x, mask) -> tuple[torch.Tensor, torch.Tensor]:
    check_tensor("x", x, floating=True)
    mask = check_mask("mask", mask, x.shape)
    if mask.device != x.device:
        raise ValueError(f"mask must be on the device of x ({x.device}), got {mask.device}")
    return x, mask


# ----------------------------------------------------------------------------------------- reference
def _stats_torch(x: torch.Tensor, m: torch.Tensor):
    """(n, mean, M2) over the valid positions, M2 = sum(m * (x - mean)^2); differentiable, fp32."""
    x = x.float()
    n = m.sum().float()
    mean = torch.where(m, x, 0.0).sum() / n.clamp(min=1)
    m2 = torch.where(m, (x - mean) ** 2, 0.0).sum()
    return n, mean, m2


def _var_from(n, m2, unbiased: bool):
    div = n - 1 if unbiased else n
    return torch.where(div > 0, m2 / div.clamp(min=1), 0.0)


# ----------------------------------------------------------------------------------------- fused path
def _row_stats(x: torch.Tensor, m: torch.Tensor, backend: str) -> torch.Tensor:
    """Per-row partials ``[R, 3]`` = (count, mean, M2) of the tensor viewed as rows, from one kernel pass."""
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, -1)
    m2 = m.reshape(x2.shape)
    if backend == "native":
        return native_module().masked_row_stats(x2, m2)
    from rlhf_fast.kernels.masked import masked_row_stats_triton
    return masked_row_stats_triton(x2, m2)


def _merge(parts: torch.Tensor):
    """Chan et al.'s parallel merge of per-row (n_r, mean_r, M2_r) into global (n, mean, M2)."""
    n_r, mean_r, m2_r = parts.double().unbind(-1)
    n = n_r.sum()
    mean = (n_r * mean_r).sum() / n.clamp(min=1)
    m2 = (m2_r + n_r * (mean_r - mean) ** 2).sum()
    return n.float(), mean.float(), m2.float()


class _FusedStats(torch.autograd.Function):
    """(n, mean, M2) by the fused kernel; d mean/dx = m/n, d M2/dx = 2 m (x - mean)."""

    @staticmethod
    def forward(ctx, x, m, backend):
        n, mean, m2 = _merge(_row_stats(x, m, backend))
        ctx.save_for_backward(x, m, n, mean)
        ctx.mark_non_differentiable(n)
        return n, mean, m2

    @staticmethod
    def backward(ctx, _gn, g_mean, g_m2):
        x, m, n, mean = ctx.saved_tensors
        grad = g_mean / n.clamp(min=1) + 2.0 * g_m2 * (x.float() - mean)
        return torch.where(m, grad, 0.0).to(x.dtype), None, None


def _stats(x, m, backend: str):
    backend = resolve_backend(backend, x)
    if backend == "torch":
        return _stats_torch(x, m)
    return _FusedStats.apply(x, m, backend)


# ----------------------------------------------------------------------------------------- public API
def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``sum(x * mask)`` in fp32, globally or along ``dim``."""
    x, mask = _checked(x, mask)
    xm = torch.where(mask, x.float(), 0.0)
    return xm.sum() if dim is None else xm.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None, backend: str = "auto") -> torch.Tensor:
    """Mean of the valid entries (0 where there are none), globally or along ``dim``; fp32."""
    x, mask = _checked(x, mask)
    if dim is not None:
        return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1)
    return _stats(x, mask, backend)[1]


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, backend: str = "auto") -> torch.Tensor:
    """Global variance of the valid entries (Bessel-corrected when ``unbiased``); 0 if undefined; fp32."""
    x, mask = _checked(x, mask)
    n, _, m2 = _stats(x, mask, backend)
    return _var_from(n, m2, unbiased)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  backend: str = "auto") -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` with global unbiased statistics (``+ mean`` back if not
    ``shift_mean``); 0 at masked positions; fp32 ``x.shape``."""
    x, mask = _checked(x, mask)
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    x = x.float()     # one cast node, so a bf16 input's gradient is rounded once, not once per use
    n, mean, m2 = _stats(x, mask, backend)
    out = (x - mean) * torch.rsqrt(_var_from(n, m2, True) + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, 0.0)
