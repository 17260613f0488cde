"""Per-token log-prob and entropy from hidden states, with the lm_head fused: the [N, V] logits never exist.

For hidden states h [N, H], lm_head weight W [V, H], optional bias b [V], labels y [N]::

    z      = h @ W^T + b                      [N, V]   built one chunk of rows (or one tile) at a time
    z      = c * tanh(z / c)                  only with ``softcap=c`` (Gemma-2 ``final_logit_softcapping``)
    s      = z / temperature
    logp_n = s[n, y_n] - logsumexp(s[n])      (<= 0)
    H_n    = logsumexp(s[n]) - sum_j p_nj s_nj   (>= 0),   p = softmax(s)

Backward recomputes each chunk of logits instead of storing them (log-prob and entropy gradients together)::

    dz   = (g_logp (1[j = y] - p) - g_H p (log p + H)) / temperature   (* (1 - tanh^2) with softcap)
    dh   = dz @ W          dW = dz^T @ h   (fp32 accumulator, cast to W's dtype)      db = sum_n dz

Rows whose label is ``ignore_index`` give logp = H = 0 and no gradient. Memory beyond inputs, outputs and
gradients is O(chunk_size * V), never O(N * V).

Backends:
- ``torch`` / ``native`` (CPU): chunks of ``chunk_size`` rows; per chunk ``z = h_c @ W^T`` with torch.matmul
  (MKL/oneDNN), then the one-pass log-sum-exp / entropy and its in-place gradient of
  :mod:`rlhf_fast.ops.logprob` (its torch or C++ kernel); ``dh_c = dz @ W``, ``dW += dz^T @ h_c``.
- ``triton``: the forward is one fused kernel (kernels/linear_logprob.py: ``tl.dot`` tiles, online
  log-sum-exp over vocabulary tiles, split over the vocabulary for parallelism). The backward is the chunked
  path above with cuBLAS matmuls and the Triton log-prob backward of :mod:`rlhf_fast.kernels.logprob` on each
  chunk (a fused dh/dW kernel would need atomics on dh or a third recompute; cuBLAS is at roofline there).
"""
from __future__ import annotations

import torch

from rlhf_fast._backend import resolve_backend
from rlhf_fast._validation import check_labels, check_positive, check_same_device, check_tensor
from rlhf_fast.ops.logprob import logprob_entropy_backward, logprob_entropy_forward

__all__ = ["linear_logprobs", "default_chunk_size"]

# Bytes of one chunk of logits: 64 MiB on CPU (6% of the [2048, 128000] fp32 logits; chunks of >= 100 rows
# keep the matmuls at full speed), 1 GiB on GPU (where larger GEMMs pay off).
_CHUNK_BYTES = {"cpu": 64 * 2**20, "cuda": 2**30}


def default_chunk_size(n_rows: int, vocab: int, device: torch.device) -> int:
    """Rows per chunk: as many as fit in the per-device logits budget, a multiple of 8, at least 8."""
    budget = _CHUNK_BYTES.get(device.type, _CHUNK_BYTES["cpu"])
    rows = max(8, budget // (4 * vocab) // 8 * 8)
    return max(1, min(n_rows, rows))


def _chunk_logits(h_c, weight, bias, softcap, out):
    """``z = h_c @ W^T (+ b)``, soft-capped in place; written into ``out`` [n, V]."""
    if bias is None:
        torch.mm(h_c, weight.t(), out=out)
    else:
        torch.addmm(bias, h_c, weight.t(), out=out)
    if softcap is not None:
        out.div_(softcap).tanh_().mul_(softcap)
    return out


def _chunked_forward(hidden, weight, bias, labels, temperature, ignore_index, need_entropy, softcap, chunk,
                     backend):
    N, V = hidden.shape[0], weight.shape[0]
    out_dtype = torch.promote_types(hidden.dtype, torch.float32)
    logp = hidden.new_empty(N, dtype=out_dtype)
    lse = hidden.new_empty(N, dtype=out_dtype)
    entropy = hidden.new_empty(N, dtype=out_dtype) if need_entropy else None
    buf = hidden.new_empty(min(chunk, N), V)
    for s in range(0, N, chunk):
        e = min(s + chunk, N)
        z = _chunk_logits(hidden[s:e], weight, bias, softcap, buf[: e - s])
        lp, en, ls = logprob_entropy_forward(z, labels[s:e], temperature, ignore_index, need_entropy, backend)
        logp[s:e], lse[s:e] = lp, ls
        if need_entropy:
            entropy[s:e] = en
    logp.clamp_(max=0.0)            # exact signs despite rounding when one logit dominates
    if need_entropy:
        entropy.clamp_(min=0.0)
    return logp, entropy, lse


def _chunked_backward(hidden, weight, bias, labels, lse, entropy, grad_logp, grad_entropy, temperature,
                      ignore_index, softcap, chunk, backend, needs):
    """Gradients for (hidden, weight, bias), each None unless ``needs`` asks for it."""
    N, V = hidden.shape[0], weight.shape[0]
    need_h, need_w, need_b = needs
    grad_h = torch.empty_like(hidden) if need_h else None
    acc = torch.promote_types(weight.dtype, torch.float32)
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    grad_b = torch.zeros(V, dtype=acc, device=weight.device) if need_b else None
    buf = hidden.new_empty(min(chunk, N), V)
    dbuf = hidden.new_empty(min(chunk, N), V) if softcap is not None else buf
    for s in range(0, N, chunk):
        e = min(s + chunk, N)
        h_c = hidden[s:e]
        z = _chunk_logits(h_c, weight, bias, softcap, buf[: e - s])
        dz = logprob_entropy_backward(
            z, labels[s:e], lse[s:e], None if grad_logp is None else grad_logp[s:e],
            None if grad_entropy is None else grad_entropy[s:e], temperature, ignore_index, backend,
            out=dbuf[: e - s], entropy=None if entropy is None else entropy[s:e])
        if softcap is not None:  # d(c tanh(x / c))/dx = 1 - tanh^2 = 1 - (z / c)^2
            dz.mul_(1 - (z / softcap).square_())
        if need_h:
            torch.mm(dz, weight, out=grad_h[s:e])
        if need_w or need_b:
            dz_acc = dz.to(acc)
            if need_w:
                grad_w.addmm_(dz_acc.t(), h_c.to(acc))
            if need_b:
                grad_b += dz_acc.sum(0)
    return (grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype))


class _LinearLogprobFunction(torch.autograd.Function):
    """Fused lm_head + log-prob/entropy; saves only hidden, weight, bias, labels and per-row statistics."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, ignore_index, need_entropy, softcap, chunk,
                backend):
        ctx.set_materialize_grads(False)
        if backend == "triton":
            from rlhf_fast.kernels.linear_logprob import linear_logprob_forward_triton  # noqa: PLC0415
            logp, entropy, lse = linear_logprob_forward_triton(hidden, weight, bias, labels, temperature,
                                                               ignore_index, need_entropy, softcap)
        else:
            logp, entropy, lse = _chunked_forward(hidden, weight, bias, labels, temperature, ignore_index,
                                                  need_entropy, softcap, chunk, backend)
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
        ctx.args = (temperature, ignore_index, softcap, chunk, backend)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if (grad_logp is None and grad_entropy is None) or not any(needs):
            return (None,) * 10
        temperature, ignore_index, softcap, chunk, backend = ctx.args
        grads = _chunked_backward(hidden, weight, bias, labels, lse, entropy, grad_logp, grad_entropy,
                                  temperature, ignore_index, softcap, chunk, backend, needs)
        return (*grads, None, None, None, None, None, None, None)


def _check_args(hidden, weight, labels, bias, softcap, chunk_size, ignore_index):
    check_tensor("hidden", hidden, floating=True)
    check_tensor("weight", weight, floating=True, ndim=2)
    if hidden.dim() < 1:
        raise ValueError(f"hidden must be [..., H], got shape {tuple(hidden.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    V = weight.shape[0]
    if bias is not None:
        check_tensor("bias", bias, floating=True, ndim=1)
        if bias.shape[0] != V or bias.dtype != weight.dtype:
            raise ValueError(f"bias must be [{V}] of dtype {weight.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    check_tensor("labels", labels)
    check_same_device({"hidden": hidden, "weight": weight, "labels": labels, "bias": bias})
    labels1d = check_labels(labels, hidden.shape[:-1], "hidden.shape[:-1]", V, ignore_index)
    check_positive("softcap", softcap, allow_none=True)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return labels1d


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None,
                    temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = False,
                    softcap: float | None = None, chunk_size: int | None = None, backend: str = "auto"
                    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``log softmax(lm_head(hidden) / temperature)[labels]`` per token without building the logits.

    Args:
        hidden: [..., H] fp32/bf16/fp16 (fp64 on the CPU backends); differentiable.
        weight: [V, H] lm_head weight, hidden's dtype; differentiable (gradient accumulated in fp32).
        labels: [...] integer ids in [0, V), or ``ignore_index`` (-> logp = entropy = 0, zero gradient).
        bias: optional [V]; differentiable.
        temperature: positive; logits (after the soft cap) are divided by it.
        return_entropy: also return H = -sum p log p per token (differentiable too).
        softcap: optional c > 0: logits become c * tanh(z / c) before the temperature (Gemma-2).
        chunk_size: rows of logits built at once (CPU backends and every backward); default
            :func:`default_chunk_size` (64 MiB of logits on CPU).
        backend: "auto" | "triton" | "native" | "torch".
    Returns:
        logp [...] fp32, or ``(logp, entropy)``. See the module docstring for the math.
    """
    labels1d = _check_args(hidden, weight, labels, bias, softcap, chunk_size, ignore_index)
    temperature = check_positive("temperature", temperature)
    backend = resolve_backend(backend, hidden)
    if hidden.dtype == torch.float64 and backend != "torch":
        raise TypeError("float64 hidden states run on backend='torch' only (the checkable reference)")
    H, V = weight.shape[1], weight.shape[0]
    hidden2d = hidden.reshape(-1, H)
    if hidden2d.stride(-1) != 1:
        hidden2d = hidden2d.contiguous()
    chunk = chunk_size or default_chunk_size(hidden2d.shape[0], V, hidden.device)
    logp, entropy = _LinearLogprobFunction.apply(
        hidden2d, weight, bias, labels1d.contiguous(), temperature, ignore_index, return_entropy,
        None if softcap is None else float(softcap), chunk, backend)
    logp = logp.view(labels.shape)
    return (logp, entropy.view(labels.shape)) if return_entropy else logp
