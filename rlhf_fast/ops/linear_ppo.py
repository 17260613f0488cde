"""The clipped PPO objective straight from hidden states, its gradients computed in the forward.

For hidden states h [B, T, H], lm_head weight W [V, H] (optional bias b [V]), labels y, old log-probs, advantages
A and a mask m, all [B, T]; per valid token n (the valid tokens packed, in row-major order)::

    z_n    = c * tanh((h_n @ W^T + b) / c)             [V]   (soft cap only with ``softcap=c``)
    logp_n = log softmax(z_n / temperature)[y_n]           H_n = entropy of softmax(z_n / temperature)
    pg_n   = the clipped surrogate of rlhf_fast.ops.policy_loss (ratio, clip, dual clip, truncated IS)
    w_n    = loss_scale * s_b(n)                       s_b: the ``agg`` mode's row scale (rlhf_fast.ops.agg)
    loss   = sum_n w_n * (pg_n - entropy_coef * H_n)

Every term is a per-token function of (logp_n, H_n), so the upstream gradient of each token is known in the
forward: ``g_logp = w_n * d pg_n / d logp_n``, ``g_H = -entropy_coef * w_n``. One sweep over blocks of rows
(each block's logits whole, ``rows x V``) therefore does everything::

    z   = h[rows] @ W^T (+ b, soft cap)                                  2 rows H V FLOPs (CPU: 1024-column slices)
    logp, H, lse of each row;  g_logp, g_H                               (the log-prob and policy-loss kernels)
    dz  = (g_logp (1[j = y] - p) - g_H p (log p + H)) / temperature      in place over the block's logits
          (* (1 - (z / c)^2) with softcap)
    dh[rows] = dz @ W      dW += dz^T @ h[rows]      db += sum_rows dz   4 rows H V FLOPs (the first block: dW =)

and the backward only multiplies the stored (dh, dW, db) by the upstream scalar: 6 N H V FLOPs for forward plus
backward, where ``linear_logprobs`` + ``ppo_policy_loss`` need 8 (their backward recomputes the logits). Memory
beyond inputs, outputs and gradients: one block of logits (64-256 MiB, at most ~8.4% of [N, V] above 64 MiB,
see ``default_block_rows``; the same bytes with a soft cap), never [N, V]. Masked tokens (and tokens whose label
is ``ignore_index``) are dropped before the lm_head: no FLOPs, no gradient.

Stats: those of ``ppo_policy_loss`` over the valid tokens (clipfrac, clipfrac_lower, approx_kl, ratio_mean/max/min,
tis_weight_mean/tis_clipfrac), plus ``entropy`` (mean H) when it is computed.

Backends: ``torch`` is the reference (explicit [N, V] logits, plain autograd; float64 capable); ``native``
(CPU: torch.mm tiles + the C++ log-prob and policy-loss kernels) and ``triton`` (CUDA: cuBLAS tiles + the Triton
log-prob and policy-loss kernels) run the fused sweep above. ``agg="none"`` has no scalar loss, so no fused form:
use ``linear_logprobs`` + ``ppo_policy_loss`` there.
"""
from __future__ import annotations

import math

import torch

from rlhf_fast._backend import resolve_backend
from rlhf_fast._validation import check_choice, check_in_range, check_mask, check_positive, check_same_device, \
    check_same_shape, check_tensor
from rlhf_fast.ops.agg import AGG_MODES, row_scale
from rlhf_fast.ops.linear_logprob import _check_args, _scratch, _tile_logits
from rlhf_fast.ops.logprob import logprob_entropy_backward, logprob_entropy_forward, logprob_entropy_torch
from rlhf_fast.ops.policy_loss import _NO_DUAL_CLIP, _launch_forward, _stats_from_parts, check_clip_args, \
    policy_loss_torch

__all__ = ["linear_ppo_objective", "default_block_rows"]

FUSED_AGG_MODES = tuple(a for a in AGG_MODES if a != "none")


# One block of whole-vocabulary logits: at least 16M elements on CPU (64 MiB of fp32), 32M on GPU (64 MiB of bf16;
# cuBLAS runs the block's matmuls at full speed from ~1000 rows), grown up to 4x that towards 1/12 of [N, V]:
# every block streams W [V, H] and dW once more, so fewer, larger blocks trade memory (<= 8.4% of [N, V] above the
# floor) for W/dW traffic (measured at N2048xV128000: 131 rows 9.2 s, 164 rows 6.7 s for forward + backward).
_BLOCK_ELEMS = {"cpu": 2**24, "cuda": 2**25}
_BLOCK_SHARE = 12
_BLOCK_GROWTH = 4

# The block's logits are written in slices of this many vocabulary columns on CPU: MKL runs the 170 x 128000 x 512
# logits matmul of N2048xH512xV128000 at ~110 GFLOP/s in one call, up to ~140 in slices (a slice of W stays in
# cache). Forward + backward, same run (2026-12-08): 0.90x the unfused time sliced vs 1.14x in one call there;
# N8192xH2048xV32000 (682 rows) 0.93x vs 0.92x, no change. cuBLAS gets the whole block in one call.
_LOGIT_SLICE = {"cpu": 1024}


def default_block_rows(n_rows: int, vocab: int, device: torch.device, softcap: bool = False) -> int:
    """Rows of one block of whole-vocabulary logits: ``clamp(N·V / 12, floor, 4·floor) / V`` elements (floor 16M
    on CPU, 32M on GPU; half with a soft cap, which keeps z beside dz), at least 1, at most ``n_rows``."""
    floor = _BLOCK_ELEMS.get(device.type, _BLOCK_ELEMS["cpu"])
    budget = min(max(n_rows * vocab // _BLOCK_SHARE, floor), _BLOCK_GROWTH * floor) // (2 if softcap else 1)
    return max(1, min(n_rows, budget // max(vocab, 1)))


# ----------------------------------------------------------------------------------------- reference
def linear_ppo_torch(hidden, weight, bias, labels, old_logp, advantages, w, valid, rollout_logp, clip, entropy_coef,
                     temperature, softcap, need_entropy, ignore_index):
    """The module-docstring objective with explicit logits and plain autograd on every position (hidden [B*T, H],
    labels [B*T]; the rest [B, T], ``w`` the token weights, ``valid`` the mask). Returns
    ``(loss, stats, logp, entropy or None)``, logp/entropy [B, T] and 0 where not valid; float64 for float64
    inputs, else fp32."""
    acc = torch.promote_types(hidden.dtype, torch.float32)
    z = hidden.to(acc) @ weight.to(acc).t()
    if bias is not None:
        z = z + bias.to(acc)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp, entropy, _ = logprob_entropy_torch(z, torch.where(valid.reshape(-1), labels, ignore_index), temperature,
                                             ignore_index, need_entropy)
    logp = logp.view(valid.shape)
    old = logp.detach() if old_logp is None else old_logp
    clip_low, clip_high, dual_clip, tis_cap = clip
    loss, stats = policy_loss_torch(logp, old, advantages, valid, clip_low, clip_high, dual_clip, "token-sum",
                                    rollout_logp, tis_cap, w, dtype=acc)
    if need_entropy:
        entropy = entropy.view(valid.shape)
        loss = loss - entropy_coef * (w.to(acc) * entropy).sum()
        stats["entropy"] = entropy.detach().sum() / valid.sum().clamp(min=1)
    return loss, stats, logp.detach(), None if entropy is None else entropy.detach()


# ----------------------------------------------------------------------------------------- fused sweep
def _block_logits(h_c, weight, bias, softcap, out):
    """``out [rows, V] = h_c @ W^T (+ b)``, soft-capped, in slices of ``_LOGIT_SLICE`` vocabulary columns."""
    V = weight.shape[0]
    width = _LOGIT_SLICE.get(h_c.device.type, V)
    for v0 in range(0, V, width):
        v1 = min(v0 + width, V)
        _tile_logits(h_c, weight, bias, softcap, v0, v1, out[:, v0:v1])
    return out


def _policy_block(backend, tensors, params, need_grad):
    """Per-token policy loss of one block of packed tokens (``tensors`` = logp, old, adv, mask, rollout, w as
    [1, n], w the token weights): ``(parts [1, 10] with parts[0, 0] = sum w pg, g_logp = w d pg / d logp [n])``."""
    if backend == "native":
        parts, _, dtok = _launch_forward("native", tensors, params, False, need_grad)
        return parts, None if dtok is None else dtok[0]
    from rlhf_fast.kernels.policy_loss import policy_loss_backward_triton, policy_loss_forward_triton  # noqa: PLC0415
    parts, _ = policy_loss_forward_triton(*tensors, *params, False)
    if not need_grad:
        return parts, None
    return parts, policy_loss_backward_triton(*tensors, parts.new_ones(1), *params)[0]


def _fused_sweep(hidden, weight, bias, labels, old_logp, advantages, w, rollout_logp, params, entropy_coef,
                 temperature, softcap, need_entropy, rows, backend, needs):
    """The one sweep of the module docstring over packed tokens. Returns
    ``(loss, parts [blocks, 10], logp [n], entropy [n] or None, (dh, dW, db) with None where not needed)``."""
    n, V = hidden.shape[0], weight.shape[0]
    need_h, need_w, need_b = needs
    need_grad = any(needs)
    acc = torch.float32
    logp = hidden.new_empty(n, dtype=acc)
    entropy = hidden.new_empty(n, dtype=acc) if need_entropy else None
    grad_h = torch.empty_like(hidden) if need_h else None
    alloc_w = torch.empty if n else torch.zeros   # the first block writes dW; no block: zero
    grad_w = alloc_w(weight.shape, dtype=acc, device=weight.device) if need_w else None
    grad_b = torch.zeros(V, dtype=acc, device=weight.device) if need_b else None
    loss = hidden.new_zeros((), dtype=acc)
    buf = hidden.new_empty(min(rows, max(n, 1)), V)
    dbuf = hidden.new_empty(buf.shape) if softcap is not None and need_grad else buf
    ones = torch.ones(1, min(rows, max(n, 1)), dtype=torch.bool, device=hidden.device)
    all_parts = []
    for s in range(0, n, rows):
        e = min(s + rows, n)
        h_c, y_c, w_c = hidden[s:e], labels[s:e], w[s:e]
        z = _block_logits(h_c, weight, bias, softcap, _scratch(buf, e - s, V))
        lp, ent, lse = logprob_entropy_forward(z, y_c, temperature, -1, need_entropy, backend)
        lp.clamp_(max=0.0)
        logp[s:e] = lp
        old = lp if old_logp is None else old_logp[s:e]
        tensors = (lp[None], old[None], advantages[s:e][None], ones[:, : e - s],
                   None if rollout_logp is None else rollout_logp[s:e][None], w_c[None])
        parts, g_logp = _policy_block(backend, tensors, params, need_grad)
        all_parts.append(parts)
        loss += parts[0, 0]
        if need_entropy:
            entropy[s:e] = ent.clamp_(min=0.0)
            if entropy_coef:
                loss -= entropy_coef * (w_c * ent).sum()
        if not need_grad:
            continue
        g_ent = w_c * -entropy_coef if entropy_coef else None
        dz = logprob_entropy_backward(z, y_c, lse, g_logp, g_ent, temperature, -1, backend,
                                      out=_scratch(dbuf, e - s, V), entropy=ent)
        if softcap is not None:   # d(c tanh(x / c))/dx = 1 - (z / c)^2, z no longer needed: computed in place
            dz.mul_(z.div_(softcap).square_().neg_().add_(1.0))
        if need_h:
            torch.mm(dz, weight, out=grad_h[s:e])
        if need_w:
            _accumulate_dw(grad_w, dz, h_c, first=s == 0)
        if need_b:
            grad_b += dz.sum(0, dtype=acc)
    parts = torch.cat(all_parts) if all_parts else hidden.new_zeros(1, 10, dtype=acc)
    return loss, parts, logp, entropy, (grad_h, grad_w, grad_b)


def _accumulate_dw(grad_w, dz, h_c, first):
    """``dW [V, H] (+)= dz^T @ h_c`` (dz [rows, V], h_c [rows, H]) into the fp32 ``grad_w``: the first block
    writes it (no zero fill to read back), later blocks add to it (in place when dz is fp32)."""
    if dz.dtype != grad_w.dtype:
        part = torch.mm(dz.t(), h_c)
        (grad_w.copy_ if first else grad_w.add_)(part)
    elif first:
        torch.mm(dz.t(), h_c, out=grad_w)
    else:
        grad_w.addmm_(dz.t(), h_c)


class _LinearPPOFunction(torch.autograd.Function):
    """Outputs (loss, parts, logp, entropy or None); the last three carry no gradient. The forward computes and keeps
    the gradients of the loss; the backward scales them by the upstream gradient (once: they are handed over)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, idx, labels, old_logp, advantages, w, rollout_logp, args, needs):
        packed = hidden if idx is None else hidden.index_select(0, idx)
        loss, parts, logp, entropy, grads = _fused_sweep(packed, weight, bias, labels, old_logp, advantages, w,
                                                         rollout_logp, *args, needs)
        grad_h, grad_w, grad_b = grads
        if grad_h is not None and idx is not None:
            grad_h = hidden.new_zeros(hidden.shape).index_copy_(0, idx, grad_h)
        ctx.grads = (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                     None if grad_b is None else grad_b.to(bias.dtype))
        ctx.mark_non_differentiable(*(t for t in (parts, logp, entropy) if t is not None))
        return loss, parts, logp, entropy

    @staticmethod
    def backward(ctx, grad_loss, *_):
        if ctx.grads is None:
            raise RuntimeError("linear_ppo_objective computes its gradients in the forward and hands them over in "
                               "the first backward; a second backward through it (retain_graph) is not supported")
        grads, ctx.grads = ctx.grads, None
        if grad_loss.device.type != "cpu" or grad_loss.item() != 1.0:   # CPU: skip the multiply by 1
            grads = tuple(None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads)
        return (*grads, *(None,) * 8)


# ----------------------------------------------------------------------------------------- public op
def _check_policy_args(old_logp, advantages, mask, rollout_logp, labels, clip_low, clip_high, dual_clip, tis_cap,
                       entropy_coef, agg, loss_scale):
    if labels.dim() != 2:
        raise ValueError(f"labels must be [B, T], got shape {tuple(labels.shape)}")
    for name, t in (("old_logp", old_logp), ("advantages", advantages), ("rollout_logp", rollout_logp)):
        if t is not None:
            check_tensor(name, t, floating=True)
            check_same_shape(name, t, "labels", labels)
    mask = check_mask("mask", mask, labels.shape)
    check_clip_args(clip_low, clip_high, dual_clip, tis_cap, rollout_logp)
    check_in_range("entropy_coef", entropy_coef, -math.inf, math.inf)
    if agg == "none":
        raise ValueError("agg='none' has no scalar loss to fuse; use linear_logprobs + ppo_policy_loss")
    check_choice("agg", agg, FUSED_AGG_MODES)
    if isinstance(loss_scale, torch.Tensor):
        if loss_scale.numel() != 1:
            raise ValueError(f"loss_scale must be a number or a 1-element tensor, got shape {tuple(loss_scale.shape)}")
    elif not isinstance(loss_scale, (int, float)) or not math.isfinite(loss_scale):
        raise ValueError(f"loss_scale must be a finite number or a 1-element tensor, got {loss_scale!r}")
    return mask


def linear_ppo_objective(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         old_logp: torch.Tensor | None, advantages: torch.Tensor, mask: torch.Tensor, *,
                         bias: torch.Tensor | None = None, clip_low: float = 0.2, clip_high: float = 0.2,
                         dual_clip: float | None = None, entropy_coef: float = 0.0, agg: str = "token-mean",
                         loss_scale: float | torch.Tensor = 1.0, temperature: float = 1.0,
                         softcap: float | None = None, rollout_logp: torch.Tensor | None = None,
                         tis_cap: float | None = None, ignore_index: int = -100, return_entropy: bool = False,
                         return_tokens: bool = False, chunk_size: int | None = None, backend: str = "auto"):
    """Clipped PPO policy loss minus the entropy bonus, from hidden states; see the module docstring.

    Args:
        hidden: [B, T, H] fp32/bf16/fp16 (fp64 on backend="torch"): the states whose next token is ``labels``.
        weight: [V, H] lm_head weight, hidden's dtype. hidden, weight and bias are differentiable.
        labels: [B, T] token ids in [0, V) at valid positions; ``ignore_index`` marks a position invalid.
        old_logp: [B, T] behaviour log-probs, or None for the on-policy pass (old = logp.detach(): ratio 1).
        advantages, mask: [B, T]; mask bool or {0, 1}.
        clip_low, clip_high, dual_clip, rollout_logp, tis_cap: as ``ppo_policy_loss``.
        entropy_coef: the entropy bonus weight c in ``loss = sum w (pg - c H)``.
        agg: an aggregation mode of rlhf_fast.ops.agg except "none" (the row scales ``s_b`` come from ``mask``).
        loss_scale: a factor on the whole loss (e.g. ``ops.agg.global_batch_scale`` for a micro-batch); it is
            known in the forward, which computes the gradients.
        temperature, softcap: as ``linear_logprobs``.
        return_entropy: compute H and report its mean in ``stats["entropy"]`` even when entropy_coef is 0.
        return_tokens: also return the per-token log-probs and entropies [B, T] fp32 (detached; 0 at invalid
            positions; the entropy None unless computed).
        chunk_size: tokens per block of whole-vocabulary logits (default :func:`default_block_rows`).
        backend: "auto" | "triton" | "native" | "torch".
    Returns:
        ``(loss, stats)`` or ``(loss, stats, logp, entropy)``: loss a 0-dim fp32 tensor (float64 for float64 inputs on the
        torch backend), stats a dict of detached 0-dim tensors.
    """
    check_tensor("hidden", hidden, floating=True, ndim=3)
    labels1d, bad = _check_args(hidden, weight, labels, bias, softcap, chunk_size, None, ignore_index)
    mask = _check_policy_args(old_logp, advantages, mask, rollout_logp, labels, clip_low, clip_high, dual_clip,
                              tis_cap, entropy_coef, agg, loss_scale)
    check_same_device({"hidden": hidden, "old_logp": old_logp, "advantages": advantages, "mask": mask,
                       "rollout_logp": rollout_logp})
    temperature = check_positive("temperature", temperature)
    backend = resolve_backend(backend, hidden)
    if hidden.dtype == torch.float64 and backend != "torch":
        raise TypeError("float64 hidden states run on backend='torch' only (the checkable reference)")

    B, T, H = hidden.shape
    valid = mask & (labels != ignore_index)
    scale = loss_scale if isinstance(loss_scale, torch.Tensor) else float(loss_scale)
    w_rows = row_scale(valid.sum(-1).to(torch.float32), T, agg) * scale
    clip = (float(clip_low), float(clip_high), None if dual_clip is None else float(dual_clip), tis_cap)
    need_entropy = bool(return_entropy) or entropy_coef != 0
    softcap = None if softcap is None else float(softcap)
    hidden2d = hidden.reshape(B * T, H)
    if backend == "torch":
        acc = torch.promote_types(hidden.dtype, torch.float32)
        loss, stats, logp, entropy = linear_ppo_torch(
            hidden2d, weight, bias, labels1d, old_logp, advantages, w_rows.to(acc)[:, None].expand(B, T), valid,
            rollout_logp, clip, float(entropy_coef), temperature, softcap, need_entropy, ignore_index)
    else:
        loss, stats, logp, entropy = _fused(hidden2d, weight, bias, labels1d, valid, old_logp, advantages,
                                            rollout_logp, w_rows, clip, float(entropy_coef), temperature, softcap,
                                            need_entropy, chunk_size, backend)
    if bad is not None:   # CUDA / compiled: out-of-range labels poison the loss instead of a device sync
        loss = torch.where(bad.any(), float("nan"), loss)
    return (loss, stats, logp, entropy) if return_tokens else (loss, stats)


def _fused(hidden2d, weight, bias, labels1d, valid, old_logp, advantages, rollout_logp, w_rows, clip, entropy_coef,
           temperature, softcap, need_entropy, chunk_size, backend):
    """The fused sweep on the valid tokens packed: ``(loss, stats, logp [B, T], entropy [B, T] or None)``."""
    B, T = valid.shape
    flat = valid.reshape(-1)
    idx = None if bool(flat.all()) else flat.nonzero().squeeze(-1)

    def pack(t):
        if t is None:
            return None
        t = t.reshape(-1) if idx is None else t.reshape(-1).index_select(0, idx)
        return t.to(torch.float32).contiguous()

    def place(t):
        if t is None or idx is None:
            return None if t is None else t.view(B, T)
        return t.new_zeros(B * T).index_copy_(0, idx, t).view(B, T)

    labels = (labels1d if idx is None else labels1d.index_select(0, idx)).contiguous()
    clip_low, clip_high, dual_clip, tis_cap = clip
    params = (clip_low, clip_high, _NO_DUAL_CLIP if dual_clip is None else dual_clip,
              math.inf if tis_cap is None else float(tis_cap))
    rows = chunk_size or default_block_rows(labels.numel(), weight.shape[0], hidden2d.device, softcap is not None)
    grad_on = torch.is_grad_enabled()
    needs = tuple(grad_on and t is not None and t.requires_grad for t in (hidden2d, weight, bias))
    args = (params, entropy_coef, temperature, softcap, need_entropy, rows, backend)
    if hidden2d.stride(-1) != 1:
        hidden2d = hidden2d.contiguous()
    loss, parts, logp, entropy = _LinearPPOFunction.apply(
        hidden2d, weight, bias, idx, labels, pack(old_logp), pack(advantages), pack(w_rows[:, None].expand(B, T)),
        pack(rollout_logp), args, needs)
    stats = _stats_from_parts(parts, rollout_logp is not None)
    if need_entropy:
        stats["entropy"] = entropy.sum() / max(labels.numel(), 1)
    return loss, stats, place(logp), place(entropy)
