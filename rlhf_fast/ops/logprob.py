"""Per-token log-probability and entropy from logits, without [N, V] temporaries.

For one row of logits ``z`` (length V), temperature ``tau`` and label ``y``::

    s      = z / tau
    lse    = logsumexp(s)                    online: m <- max(m, s_j), d <- d*exp(m_old - m) + exp(s_j - m),
                                             m starts at -inf (never 0), lse = m + log(d)
    p_j    = exp(s_j - lse)
    logp   = s_y - lse                       (<= 0)
    H      = -sum_j p_j log p_j = lse - sum_j p_j s_j      (>= 0)

Gradients, written in one pass over the row (log-prob and entropy together)::

    dlogp/dz_j = (1[j = y] - p_j) / tau
    dH/dz_j    = -p_j (log p_j + H) / tau
    dz_j       = g_logp * dlogp/dz_j + g_H * dH/dz_j

Rows whose label equals ``ignore_index`` give logp = H = 0 and a zero gradient. The building blocks
(``logprob_entropy_forward``/``_backward``) also take labels outside [0, V): such a row has no ``s_y`` term
(logp = 0, gradient ``-p_j (g_logp + g_H (log p_j + H)) / tau``) but its lse and H as usual: one vocabulary
slice of the tiled lm_head (rlhf_fast.ops.linear_logprob) whose rows' labels lie in another slice.
Shapes: logits [..., V], labels [...]; outputs fp32 [...]. Accumulation is fp32 for fp32/bf16/fp16
logits (float64 logits on the torch backend compute and return float64: the checkable spec).

Backends: ``torch`` (plain autograd, the spec), ``native`` (C++/OpenMP, csrc/logprob.cpp) and
``triton`` (kernels/logprob.py). native and triton read logits in place when the last dimension is
contiguous (e.g. ``logits[:, :-1]`` needs no copy) and their backward writes dlogits in the logits dtype.
"""
from __future__ import annotations

import torch

from rlhf_fast._backend import native_module, resolve_backend
from rlhf_fast._validation import check_labels, check_positive, check_same_device, check_tensor, poison_rows

__all__ = ["logprobs_from_logits", "logprob_entropy_forward", "logprob_entropy_backward"]


# ---------------------------------------------------------------------------------------------------------------
# torch: the specification
# ---------------------------------------------------------------------------------------------------------------

def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _in_row(labels1d: torch.Tensor, valid: torch.Tensor, V: int) -> torch.Tensor:
    """Rows whose label indexes this row of logits (valid and in [0, V))."""
    return valid & (labels1d >= 0) & (labels1d < V)


def logprob_entropy_torch(logits2d: torch.Tensor, labels1d: torch.Tensor, temperature: float, ignore_index: int,
                          need_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The module-docstring formulas in torch (differentiable): ``(logp, entropy or None, lse)``, each [N].

    log_softmax subtracts the row max before the exp, as the kernels do; the clamp only turns 0 * log 0
    (a -inf logit) into 0 instead of NaN.
    """
    s = logits2d.to(_acc_dtype(logits2d.dtype)) / temperature
    valid = labels1d != ignore_index
    hit = _in_row(labels1d, valid, s.shape[-1])
    log_p = torch.log_softmax(s, dim=-1)
    logp = torch.where(hit, log_p.gather(-1, torch.where(hit, labels1d, 0).unsqueeze(-1)).squeeze(-1), 0.0)
    entropy = None
    if need_entropy:
        entropy = -(log_p.exp() * log_p.clamp(min=torch.finfo(s.dtype).min)).sum(-1)
        entropy = torch.where(valid, entropy.clamp(min=0.0), 0.0)
    return logp, entropy, torch.logsumexp(s.detach(), dim=-1)


def _backward_torch(logits2d, labels1d, lse, grad_logp, grad_entropy, temperature, ignore_index, entropy):
    acc = _acc_dtype(logits2d.dtype)
    s = logits2d.to(acc) / temperature
    log_p = (s - lse.to(acc).unsqueeze(-1)).clamp(min=torch.finfo(acc).min)  # -inf logit: p = 0, p * log p = 0
    p = log_p.exp()
    valid = labels1d != ignore_index
    grad = torch.zeros_like(s)
    if grad_logp is not None:
        hit = _in_row(labels1d, valid, s.shape[-1])
        onehot = torch.zeros_like(s).scatter_(-1, torch.where(hit, labels1d, 0).unsqueeze(-1),
                                              hit.to(acc).unsqueeze(-1))
        grad += grad_logp.to(acc).unsqueeze(-1) * (onehot - p)
    if grad_entropy is not None:
        if entropy is None:
            entropy = -(p * log_p).sum(-1)
        grad -= grad_entropy.to(acc).unsqueeze(-1) * p * (log_p + entropy.to(acc).unsqueeze(-1))
    return torch.where(valid.unsqueeze(-1), grad / temperature, 0.0)


# ---------------------------------------------------------------------------------------------------------------
# building blocks on [N, V] chunks (also used by rlhf_fast.ops.linear_logprob)
# ---------------------------------------------------------------------------------------------------------------

def _kernel_logits(logits2d: torch.Tensor) -> torch.Tensor:
    """native/triton read fp32/bf16/fp16 rows with a unit stride along V (row stride free)."""
    if logits2d.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        logits2d = logits2d.float()
    return logits2d if logits2d.stride(-1) == 1 or logits2d.size(-1) == 1 else logits2d.contiguous()


@torch.no_grad()
def logprob_entropy_forward(logits2d: torch.Tensor, labels1d: torch.Tensor, temperature: float, ignore_index: int,
                            need_entropy: bool, backend: str
                            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One pass over ``logits2d`` [N, V]: ``(logp [N] fp32, entropy [N] fp32 or None, lse [N] fp32)``.

    ``lse = logsumexp(logits / temperature)`` per row (also for ignored rows), what the backward needs.
    ``labels1d`` is int64 [N] on the same device; ``backend`` is already concrete ("torch", "native" or
    "triton", see rlhf_fast._backend.resolve_backend). No argument checking here: callers validate.
    Used on chunks by rlhf_fast.ops.linear_logprob; keep the signature.
    """
    if backend == "native":
        logp, entropy, lse = native_module().logprob_forward(
            _kernel_logits(logits2d), labels1d, float(temperature), int(ignore_index), bool(need_entropy))
        return logp, (entropy if need_entropy else None), lse
    if backend == "triton":
        from rlhf_fast.kernels.logprob import logprob_forward_triton  # noqa: PLC0415
        return logprob_forward_triton(_kernel_logits(logits2d), labels1d, temperature, ignore_index, need_entropy)
    logp, entropy, lse = logprob_entropy_torch(logits2d, labels1d, temperature, ignore_index, need_entropy)
    to32 = (lambda t: t) if logits2d.dtype == torch.float64 else (lambda t: None if t is None else t.float())
    return to32(logp), to32(entropy), to32(lse)


@torch.no_grad()
def logprob_entropy_backward(logits2d: torch.Tensor, labels1d: torch.Tensor, lse: torch.Tensor,
                             grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None,
                             temperature: float, ignore_index: int, backend: str, out: torch.Tensor | None = None,
                             *, entropy: torch.Tensor | None = None) -> torch.Tensor:
    """``grad_logits`` [N, V] (dtype of ``logits2d``) for upstream ``grad_logp`` / ``grad_entropy`` ([N] or None).

    One pass over each row (two when ``grad_entropy`` is given and ``entropy`` — the forward's [N] output — is
    not, to recompute H). ``lse`` is the forward's third output. Writes into ``out`` when given, which may be
    ``logits2d`` itself (in place: each row is read before it is overwritten). Ignored rows get zeros.
    Used on chunks by rlhf_fast.ops.linear_logprob; keep the signature.
    """
    if out is None:
        out = torch.empty_like(logits2d, memory_format=torch.contiguous_format)
    if grad_logp is None and grad_entropy is None:
        return out.zero_()
    if backend in ("native", "triton") and logits2d.dtype in (torch.float32, torch.bfloat16, torch.float16) \
            and out.dtype == logits2d.dtype and out.stride(-1) == 1 and logits2d.stride(-1) == 1:
        args = (logits2d, labels1d, lse, _fp32_or_none(grad_logp), _fp32_or_none(grad_entropy),
                float(temperature), int(ignore_index), out, _fp32_or_none(entropy))
        if backend == "native":
            native_module().logprob_backward(*args)
        else:
            from rlhf_fast.kernels.logprob import logprob_backward_triton  # noqa: PLC0415
            logprob_backward_triton(*args)
        return out
    grad = _backward_torch(logits2d, labels1d, lse, grad_logp, grad_entropy, temperature, ignore_index, entropy)
    return out.copy_(grad)


def _fp32_or_none(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float().contiguous()


# ---------------------------------------------------------------------------------------------------------------
# public op
# ---------------------------------------------------------------------------------------------------------------

class _LogprobFunction(torch.autograd.Function):
    """Fused forward/backward of the native and triton backends on [N, V] logits."""

    @staticmethod
    def forward(ctx, logits2d, labels1d, temperature, ignore_index, need_entropy, backend):
        logp, entropy, lse = logprob_entropy_forward(logits2d, labels1d, temperature, ignore_index, need_entropy,
                                                     backend)
        ctx.save_for_backward(logits2d, labels1d, lse, entropy)
        ctx.args = (temperature, ignore_index, backend)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: its term is skipped
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits2d, labels1d, lse, entropy = ctx.saved_tensors
        temperature, ignore_index, backend = ctx.args
        grad = logprob_entropy_backward(logits2d, labels1d, lse, grad_logp, grad_entropy, temperature,
                                        ignore_index, backend, entropy=entropy)
        return grad, None, None, None, None, None


def _rows(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] -> a view [N, V], or [B, T, V] when the rows are not evenly strided (``logits[:, :-1]``).

    native/triton address row n at ``(n // T) * stride(0) + (n % T) * stride(1)``, so neither needs a copy.
    Copies only when no such view exists.
    """
    V = logits.size(-1)
    for shape in ((-1, V), (logits.size(0) if logits.dim() > 1 else 1, -1, V)):
        try:
            return logits.view(shape)
        except RuntimeError:
            pass
    return logits.reshape(-1, V)


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                         ignore_index: int = -100, return_entropy: bool = False, backend: str = "auto"
                         ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``log softmax(logits / temperature)[labels]`` per token, and optionally the entropy of that softmax.

    Args:
        logits: [..., V] fp32/bf16/fp16 (fp64 on the torch backend); differentiable.
        labels: [...] integer token ids in [0, V), or ``ignore_index`` (-> logp = entropy = 0, zero gradient).
            Others raise a ValueError on CPU; on CUDA and under torch.compile they give NaN (no device sync).
        temperature: positive; logits are divided by it.
        return_entropy: also return H = -sum p log p per token.
        backend: "auto" | "triton" | "native" | "torch".
    Returns:
        logp [...] fp32, or ``(logp, entropy)``. See the module docstring for the math.
    """
    check_tensor("logits", logits, floating=True)
    if logits.dim() < 1 or logits.size(-1) < 1:
        raise ValueError(f"logits must be [..., V] with V >= 1, got shape {tuple(logits.shape)}")
    check_tensor("labels", labels)
    check_same_device({"logits": logits, "labels": labels})
    V = logits.size(-1)
    labels1d, bad = check_labels(labels, logits.shape[:-1], "logits.shape[:-1]", V, ignore_index)
    temperature = check_positive("temperature", temperature)
    backend = resolve_backend(backend, logits)

    if backend == "torch":
        logp, entropy, _ = logprob_entropy_torch(logits.reshape(-1, V), labels1d, temperature, ignore_index, return_entropy)
        if logits.dtype != torch.float64:
            logp, entropy = logp.float(), (entropy.float() if return_entropy else None)
    else:
        logp, entropy = _LogprobFunction.apply(_kernel_logits(_rows(logits)), labels1d.contiguous(), temperature,
                                                  ignore_index, return_entropy, backend)
    logp = poison_rows(logp, bad).view(labels.shape)
    return (logp, poison_rows(entropy, bad).view(labels.shape)) if return_entropy else logp
