"""Per-token log-prob and entropy from hidden states, with the lm_head fused: the [N, V] logits never exist.

For hidden states h [N, H], lm_head weight W [V, H], optional bias b [V], labels y [N]::

    z      = h @ W^T + b                      [N, V]   built one tile [rows, cols] at a time
    z      = c * tanh(z / c)                  only with ``softcap=c`` (Gemma-2 ``final_logit_softcapping``)
    s      = z / temperature
    logp_n = s[n, y_n] - logsumexp(s[n])      (<= 0)
    H_n    = logsumexp(s[n]) - sum_j p_nj s_nj   (>= 0),   p = softmax(s)

Backward recomputes each tile of logits instead of storing them (log-prob and entropy gradients together)::

    dz   = (g_logp (1[j = y] - p) - g_H p (log p + H)) / temperature   (* (1 - tanh^2) with softcap)
    dh   = dz @ W          dW = dz^T @ h   (fp32 accumulator, cast to W's dtype)      db = sum_n dz

Rows whose label is ``ignore_index`` give logp = H = 0 and no gradient. Memory beyond inputs, outputs and
gradients is one tile, ``chunk_size * vocab_chunk_size`` logits, never O(N * V).

Tiles span ``chunk_size`` rows (tokens) by ``vocab_chunk_size`` columns (vocabulary). Rows-only chunks of a
large vocabulary would have few rows each and re-read all of W (and read-modify-write all of dW) once per
chunk; a tile of 1024 rows reads its slice of W once per 1024 tokens, so the matmuls run at full speed.

Backends:
- ``torch`` / ``native`` (CPU): per tile ``z = h_c @ W[cols]^T`` with torch.mm (MKL/oneDNN), then the one-pass
  log-sum-exp / entropy and its in-place gradient of :mod:`rlhf_fast.ops.logprob` (its torch or C++ kernel)
  on the tile; the tiles of a row merge online (see ``_tiled_forward``); ``dh += dz @ W[cols]``,
  ``dW[cols] += dz^T @ h_c``.
- ``triton``: the forward is one fused kernel (kernels/linear_logprob.py: ``tl.dot`` tiles, online
  log-sum-exp over vocabulary tiles, split over the vocabulary for parallelism). The backward is the chunked
  path above with cuBLAS matmuls and the Triton log-prob backward of :mod:`rlhf_fast.kernels.logprob` on each
  tile (a fused dh/dW kernel would need atomics on dh or a third recompute; cuBLAS is at roofline there).
"""
from __future__ import annotations

import torch

from rlhf_fast._backend import resolve_backend
from rlhf_fast._validation import check_labels, check_positive, check_same_device, check_tensor, poison_rows
from rlhf_fast.ops.logprob import logprob_entropy_backward, logprob_entropy_forward

__all__ = ["linear_logprobs", "default_tile"]

# One tile of logits: 4M elements (16 MiB in fp32) on CPU, 256M on GPU; tokens per tile: enough for matmuls at
# full speed and few passes over W (each tile row-block reads its slice of W and updates its slice of dW once).
# CPU: a tile the last-level cache holds keeps the log-prob kernel's passes over it off DRAM; forward + backward
# with entropy took 0.70x-1.00x the time of 64 MiB tiles (1024 x 4096 against 1024 x 16384; N1024xH512xV32000,
# N4096xH1024xV32000, N2048xH1024xV151936, N1024xH512xV128000; AMD EPYC, 2 cores, 2026-12-08).
_TILE_ELEMS = {"cpu": 2**22, "cuda": 2**28}
_TILE_ROWS = {"cpu": 1024, "cuda": 8192}


def default_tile(n_rows: int, vocab: int, device: torch.device, rows: int | None = None,
                 cols: int | None = None) -> tuple[int, int]:
    """``(rows, cols)`` of one logits tile, each at most the problem's: ``rows`` tokens (default 1024 on CPU,
    8192 on GPU) by ``cols`` vocabulary columns (default: as many as fit in the tile budget, a multiple of 256)."""
    kind = device.type if device.type in _TILE_ELEMS else "cpu"
    rows = min(n_rows, rows or _TILE_ROWS[kind])
    cols = cols or max(256, _TILE_ELEMS[kind] // max(rows, 1) // 256 * 256)
    return max(rows, 1), max(1, min(vocab, cols))


def _scratch(buf: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """A contiguous [n, m] view of the front of a tile buffer (narrow last tiles stay contiguous)."""
    return buf.view(-1)[: n * m].view(n, m)


def _tile_logits(h_c, weight, bias, softcap, v0, v1, out):
    """``z = h_c @ W[v0:v1]^T (+ b[v0:v1])``, soft-capped in place; written into ``out`` [n, v1 - v0]."""
    if bias is None:
        torch.mm(h_c, weight[v0:v1].t(), out=out)
    else:
        torch.addmm(bias[v0:v1], h_c, weight[v0:v1].t(), out=out)
    if softcap is not None:
        out.div_(softcap).tanh_().mul_(softcap)
    return out


def _slice_labels(labels, valid, v0, v1):
    """Labels local to the slice [v0, v1): ``y - v0`` inside it, ``v1 - v0`` (out of range: no one-hot term)
    outside it, -1 on ignored rows (passed as the kernels' ignore_index; it cannot collide with either)."""
    local = torch.where((labels >= v0) & (labels < v1), labels - v0, v1 - v0)
    return torch.where(valid, local, -1)


def _tiled_forward(hidden, weight, bias, labels, temperature, ignore_index, need_entropy, softcap, tile,
                   backend):
    """Online merge of the per-slice statistics of each tile (``lse_s`` and ``H_s`` of the slice's softmax)::

        lse = logaddexp_s lse_s      mean_p(s) = sum_s e^(lse_s - lse) (lse_s - H_s)      H = lse - mean_p(s)
        logp = s_y - lse             s_y = logp_s + lse_s of the slice holding the label
    """
    N, V = hidden.shape[0], weight.shape[0]
    rows, cols = tile
    acc = torch.promote_types(hidden.dtype, torch.float32)
    logp = hidden.new_empty(N, dtype=acc)
    lse = hidden.new_empty(N, dtype=acc)
    entropy = hidden.new_empty(N, dtype=acc) if need_entropy else None
    valid = labels != ignore_index
    buf = hidden.new_empty(rows, cols)
    for s in range(0, N, rows):
        e = min(s + rows, N)
        run_lse = hidden.new_full((e - s,), float("-inf"), dtype=acc)
        s_y = hidden.new_zeros(e - s, dtype=acc)
        mean_s = hidden.new_zeros(e - s, dtype=acc) if need_entropy else None
        for v0 in range(0, V, cols):
            v1 = min(v0 + cols, V)
            z = _tile_logits(hidden[s:e], weight, bias, softcap, v0, v1, _scratch(buf, e - s, v1 - v0))
            local = _slice_labels(labels[s:e], valid[s:e], v0, v1)
            lp_s, h_s, lse_s = logprob_entropy_forward(z, local, temperature, -1, need_entropy, backend)
            s_y += torch.where(local < v1 - v0, lp_s + lse_s, 0.0)   # ignored rows (-1) are zeroed below
            new_lse = torch.logaddexp(run_lse, lse_s)
            if need_entropy:
                mean_s.mul_(torch.exp(run_lse - new_lse)).add_(torch.exp(lse_s - new_lse) * (lse_s - h_s))
            run_lse = new_lse
        lse[s:e] = run_lse
        logp[s:e] = s_y - run_lse
        if need_entropy:
            entropy[s:e] = run_lse - mean_s
    logp = torch.where(valid, logp.clamp_(max=0.0), 0.0)      # exact signs despite rounding
    if need_entropy:
        entropy = torch.where(valid, entropy.clamp_(min=0.0), 0.0)
    return logp, entropy, lse


def _tiled_backward(hidden, weight, bias, labels, lse, entropy, grad_logp, grad_entropy, temperature,
                    ignore_index, softcap, tile, backend, needs):
    """Gradients for (hidden, weight, bias), each None unless ``needs`` asks for it. Each tile's dz depends
    only on the row's global lse and H (saved by the forward), so the tiles are independent::

        dh[rows] += dz @ W[cols]        dW[cols] += dz^T @ h[rows]        db[cols] += sum_rows dz
    """
    N, V = hidden.shape[0], weight.shape[0]
    rows, cols = tile
    need_h, need_w, need_b = needs
    if grad_entropy is not None and entropy is None:
        raise RuntimeError("the entropy gradient needs the forward's entropy")
    acc = torch.promote_types(weight.dtype, torch.float32)
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    grad_b = torch.zeros(V, dtype=acc, device=weight.device) if need_b else None
    valid = labels != ignore_index
    buf = hidden.new_empty(rows, cols)
    dbuf = hidden.new_empty(rows, cols) if softcap is not None else buf
    for s in range(0, N, rows):
        e = min(s + rows, N)
        h_c = hidden[s:e]
        dh = hidden.new_zeros(e - s, hidden.shape[1], dtype=acc) if need_h else None
        for v0 in range(0, V, cols):
            v1 = min(v0 + cols, V)
            z = _tile_logits(h_c, weight, bias, softcap, v0, v1, _scratch(buf, e - s, v1 - v0))
            dz = logprob_entropy_backward(
                z, _slice_labels(labels[s:e], valid[s:e], v0, v1), lse[s:e],
                None if grad_logp is None else grad_logp[s:e], None if grad_entropy is None else grad_entropy[s:e],
                temperature, -1, backend, out=_scratch(dbuf, e - s, v1 - v0),
                entropy=None if entropy is None else entropy[s:e])
            if softcap is not None:  # d(c tanh(x / c))/dx = 1 - tanh^2 = 1 - (z / c)^2
                dz.mul_(1 - (z / softcap).square_())
            dz_acc = dz.to(acc)
            if need_h:
                dh.addmm_(dz_acc, weight[v0:v1].to(acc))
            if need_w:
                grad_w[v0:v1].addmm_(dz_acc.t(), h_c.to(acc))
            if need_b:
                grad_b[v0:v1] += dz_acc.sum(0)
        if need_h:
            grad_h[s:e] = dh
    return (grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype))


class _LinearLogprobFunction(torch.autograd.Function):
    """Fused lm_head + log-prob/entropy; saves only hidden, weight, bias, labels and per-row statistics."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, ignore_index, need_entropy, softcap, tile,
                backend):
        ctx.set_materialize_grads(False)
        if backend == "triton":
            from rlhf_fast.kernels.linear_logprob import linear_logprob_forward_triton  # noqa: PLC0415
            logp, entropy, lse = linear_logprob_forward_triton(hidden, weight, bias, labels, temperature,
                                                               ignore_index, need_entropy, softcap)
        else:
            logp, entropy, lse = _tiled_forward(hidden, weight, bias, labels, temperature, ignore_index,
                                                  need_entropy, softcap, tile, backend)
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
        ctx.args = (temperature, ignore_index, softcap, tile, backend)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if (grad_logp is None and grad_entropy is None) or not any(needs):
            return (None,) * 10
        temperature, ignore_index, softcap, tile, backend = ctx.args
        grads = _tiled_backward(hidden, weight, bias, labels, lse, entropy, grad_logp, grad_entropy,
                                  temperature, ignore_index, softcap, tile, backend, needs)
        return (*grads, None, None, None, None, None, None, None)


def _check_args(hidden, weight, labels, bias, softcap, chunk_size, vocab_chunk_size, ignore_index):
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
    labels1d, bad = check_labels(labels, hidden.shape[:-1], "hidden.shape[:-1]", V, ignore_index)
    check_positive("softcap", softcap, allow_none=True)
    for name, value in (("chunk_size", chunk_size), ("vocab_chunk_size", vocab_chunk_size)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return labels1d, bad


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None,
                    temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = False,
                    softcap: float | None = None, chunk_size: int | None = None,
                    vocab_chunk_size: int | None = None, backend: str = "auto"
                    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``log softmax(lm_head(hidden) / temperature)[labels]`` per token without building the logits.

    Args:
        hidden: [..., H] fp32/bf16/fp16 (fp64 on the CPU backends); differentiable.
        weight: [V, H] lm_head weight, hidden's dtype; differentiable (gradient accumulated in fp32).
        labels: [...] integer ids in [0, V), or ``ignore_index`` (-> logp = entropy = 0, zero gradient).
            Others raise a ValueError on CPU; on CUDA they give NaN (no device sync).
        bias: optional [V]; differentiable.
        temperature: positive; logits (after the soft cap) are divided by it.
        return_entropy: also return H = -sum p log p per token (differentiable too).
        softcap: optional c > 0: logits become c * tanh(z / c) before the temperature (Gemma-2).
        chunk_size: rows (tokens) of one tile of logits (CPU backends and every backward); default
            :func:`default_tile` (1024 on CPU, 8192 on GPU).
        vocab_chunk_size: columns (vocabulary entries) of one tile; default: as many as fit in 16 MiB of
            fp32 logits on CPU (1 GiB on GPU).
        backend: "auto" | "triton" | "native" | "torch".
    Returns:
        logp [...] fp32, or ``(logp, entropy)``. See the module docstring for the math.
    """
    labels1d, bad = _check_args(hidden, weight, labels, bias, softcap, chunk_size, vocab_chunk_size, ignore_index)
    temperature = check_positive("temperature", temperature)
    backend = resolve_backend(backend, hidden)
    if hidden.dtype == torch.float64 and backend != "torch":
        raise TypeError("float64 hidden states run on backend='torch' only (the checkable reference)")
    H, V = weight.shape[1], weight.shape[0]
    hidden2d = hidden.reshape(-1, H)
    if hidden2d.stride(-1) != 1:
        hidden2d = hidden2d.contiguous()
    tile = default_tile(hidden2d.shape[0], V, hidden.device, chunk_size, vocab_chunk_size)
    logp, entropy = _LinearLogprobFunction.apply(
        hidden2d, weight, bias, labels1d.contiguous(), temperature, ignore_index, return_entropy,
        None if softcap is None else float(softcap), tile, backend)
    logp = poison_rows(logp, bad).view(labels.shape)
    return (logp, poison_rows(entropy, bad).view(labels.shape)) if return_entropy else logp
