"""rlhf_fast inside TRL (checked against TRL 1.16): ``rlhf_fast.integrations.trl.enable()`` before building a trainer.

Where TRL 1.16 spends its time: GRPOTrainer, RLOOTrainer, DPO, KTO and SFT call ``add_fused_lm_head(model, ...)``
and run the model with ``fused_lm_head=True``; that forward hands ``(hidden [N, H], lm_head weight [V, H], bias,
labels [N], temperature, chunk_size, final_logit_softcapping, logit_scale, outputs)`` to the module-level name
``trl.trainer.utils._ChunkedLogProbFunction`` (TRL's chunked log-prob autograd function), looked up at call
time. This integration replaces that private name (checked by signature) with :class:`FusedLMHead`, which
computes::

    z = logit_scale * (h @ W^T + b);  z = c * tanh(z / c) (softcap c);  s = z / temperature
    logp_n = s[n, y_n] - logsumexp(s[n])        H_n = logsumexp(s[n]) - sum_j p_nj s_nj      (fp32, [N] each)

with ``rlhf_fast.ops.linear_logprobs`` (``logit_scale`` folded into h and b; the autocast dtype, when autocast is
on, as the compute dtype, as TRL does). The metric outputs DPO, KTO and SFT request (no gradient) come from one
more pass over the logits tiles (:func:`metric_outputs`: one extra forward matmul, counted as
``fused_lm_head_metrics``)::

    log_sum_sq_probs_n = log sum_j p_nj^2      mean_logits_n = mean_j s_nj      is_top1_n = (y_n = argmax_j s_nj)

A call whose head is a ZeRO-3 partitioned parameter goes to TRL's own function, counted as
``fused_lm_head_fallback``.

Only the labelled rows reach the head: that forward passes ``hidden[labels != -100]`` when
``trl.trainer.utils._use_triton(device)`` (its one other private name touched here, in that module only) is
true, and on CPU, where it is false, every position, the prompt's and the padding's too (labels clamped to 0,
outputs masked to 0 afterwards). With the integration the switch is also true on CPU (:func:`labelled_rows_only`):
the same values and gradients (the masked rows' are 0 either way), from ~(prompt + padding) / length fewer
rows of lm_head work in the forward and the backward.

The logits-based public helpers of ``trl.trainer.utils`` (``selective_log_softmax``,
``selective_log_softmax_and_entropy``, ``entropy_from_logits``; TRL's experimental trainers import them by name)
become ``rlhf_fast.compat.trl``'s, in every loaded ``trl`` module holding them.

``call_counts()`` shows which ran: ``{"fused_lm_head": n, "selective_log_softmax": n, ...}``.
"""
from __future__ import annotations

import inspect

import torch

from rlhf_fast.compat import trl as compat
from rlhf_fast.integrations._patch import Integration, Patch
from rlhf_fast.ops.linear_logprob import _scratch, _tile_logits, default_tile, linear_logprobs

__all__ = ["enable", "disable", "enabled", "call_counts", "reset_counts", "FusedLMHead", "metric_outputs",
           "labelled_rows_only", "SUPPORTED"]

SUPPORTED = ">=1.16.0,<1.17"
# The private name and the argument list of its forward, as in TRL 1.16's trl/kernels/chunked_logprob.py.
_PRIVATE = "_ChunkedLogProbFunction"
_COMPACT = "_use_triton"       # trl.trainer.utils' switch: True -> only labelled rows reach _PRIVATE
_FORWARD_ARGS = ("ctx", "hidden", "weight", "bias", "targets", "temperature", "chunk_size",
                 "final_logit_softcapping", "logit_scale", "outputs")
_METRICS = ("log_sum_sq_probs", "mean_logits", "is_top1")
_HELPERS = ("selective_log_softmax", "selective_log_softmax_and_entropy", "entropy_from_logits")


@torch.no_grad()
def metric_outputs(hidden, weight, bias, targets, logp, temperature, softcap, outputs):
    """TRL's metric outputs (fp32 / bool ``[N]``, None unless in ``outputs``) from hidden ``[N, H]``, weight
    ``[V, H]``, bias, targets ``[N]`` and the fused op's ``logp`` ``[N]``, in one pass over logits tiles ``s``
    (soft-capped, divided by the temperature). ``lse = s_y - logp`` with ``s_y`` the target's logit, so::

        log_sum_sq_probs = log sum_j exp(2 (s_j - lse))     mean_logits = sum_j s_j / V
        is_top1 = s_y >= max_j s_j  and  s_y > max_{j < y} s_j      (argmax takes the first maximum)
    """
    N, V = hidden.shape[0], weight.shape[0]
    rows, cols = default_tile(N, V, hidden.device)
    s_y = torch.einsum("nh,nh->n", hidden.float(), weight[targets].float())
    if bias is not None:
        s_y += bias[targets].float()
    if softcap is not None:
        s_y = softcap * torch.tanh(s_y / softcap)
    lse = s_y / temperature - logp.float()
    sq, z_sum = lse.new_zeros(N), lse.new_zeros(N)
    top, before, target = (lse.new_full((N,), float("-inf")) for _ in range(3))
    buf = hidden.new_empty(rows, cols)
    for r0 in range(0, N, rows):
        r1 = min(r0 + rows, N)
        local = targets[r0:r1, None]
        for v0 in range(0, V, cols):
            v1 = min(v0 + cols, V)
            z = _tile_logits(hidden[r0:r1], weight, bias, softcap, v0, v1, _scratch(buf, r1 - r0, v1 - v0))
            z = z.float().div_(temperature)
            col = torch.arange(v0, v1, device=z.device)
            if "log_sum_sq_probs" in outputs:
                sq[r0:r1] += torch.exp(2 * (z - lse[r0:r1, None])).sum(-1)
            if "mean_logits" in outputs:
                z_sum[r0:r1] += z.sum(-1)
            if "is_top1" in outputs:
                top[r0:r1] = torch.maximum(top[r0:r1], z.amax(-1))
                before[r0:r1] = torch.maximum(before[r0:r1], z.masked_fill(col >= local, float("-inf")).amax(-1))
                hit = z.masked_fill(col != local, float("-inf")).amax(-1)
                target[r0:r1] = torch.maximum(target[r0:r1], hit)
    return (torch.log(sq) if "log_sum_sq_probs" in outputs else None,
            z_sum / V if "mean_logits" in outputs else None,
            (target >= top) & (target > before) if "is_top1" in outputs else None)


class FusedLMHead:
    """Stands in for TRL's ``ChunkedLogProbFunction`` where TRL's fused forward calls ``.apply``."""

    def __init__(self, original):
        self.original = original

    def apply(self, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("log_probs",)):
        """TRL's ``(logprobs, entropy, log_sum_sq_probs, mean_logits, is_top1)``, None where not requested."""
        if hasattr(weight, "ds_id"):
            _INTEGRATION.count("fused_lm_head_fallback")
            return self.original.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                       final_logit_softcapping, logit_scale, outputs)
        _INTEGRATION.count("fused_lm_head")
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        with torch.autocast(device, enabled=False):
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
            if logit_scale != 1.0:
                hidden = hidden * logit_scale
                bias = None if bias is None else bias * logit_scale
            out = linear_logprobs(hidden, weight, targets, bias, temperature=temperature,
                                  return_entropy="entropy" in outputs, softcap=final_logit_softcapping)
            logp, entropy = out if "entropy" in outputs else (out, None)
            metrics = (None, None, None)
            if set(outputs) & set(_METRICS):
                _INTEGRATION.count("fused_lm_head_metrics")
                metrics = metric_outputs(hidden.detach(), weight.detach(), None if bias is None else bias.detach(),
                                         targets, logp.detach(), temperature, final_logit_softcapping, outputs)
        return (logp, entropy, *metrics)


def labelled_rows_only(original):
    """TRL's ``_use_triton(device)`` switch, also true on CPU: its fused forward then scores only the labelled
    rows there too (eager CPU has no per-shape recompilation, the reason TRL scores every row off Triton)."""
    def compact(device: torch.device) -> bool:
        return device.type == "cpu" or original(device)
    return compact


def _patches() -> list[Patch]:
    import trl.kernels.chunked_logprob as chunked
    import trl.trainer.utils as utils
    original = getattr(utils, _PRIVATE, None)
    if original is not chunked.ChunkedLogProbFunction or \
            tuple(inspect.signature(original.forward).parameters) != _FORWARD_ARGS:
        raise RuntimeError(f"rlhf_fast.integrations.trl: trl.trainer.utils.{_PRIVATE} is not TRL 1.16's "
                           f"ChunkedLogProbFunction{_FORWARD_ARGS}; not patching")
    switch = getattr(utils, _COMPACT, None)
    if switch is not chunked._use_triton:
        raise RuntimeError(f"rlhf_fast.integrations.trl: trl.trainer.utils.{_COMPACT} is not TRL 1.16's "
                           f"chunked_logprob._use_triton; not patching")
    return [Patch(utils, _PRIVATE, FusedLMHead(original)),
            Patch(utils, _COMPACT, labelled_rows_only(switch), rebind=False)] + [
        Patch(utils, name, _INTEGRATION.counted(name, getattr(compat, name))) for name in _HELPERS]


_INTEGRATION = Integration("trl", "trl", SUPPORTED, _patches)
enable, disable, enabled = _INTEGRATION.enable, _INTEGRATION.disable, _INTEGRATION.enabled
call_counts, reset_counts = _INTEGRATION.call_counts, _INTEGRATION.reset_counts
