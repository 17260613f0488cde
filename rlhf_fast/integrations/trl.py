"""rlhf_fast inside TRL (checked against TRL 1.16): ``rlhf_fast.integrations.trl.enable()`` before building a trainer.

Where TRL 1.16 spends its time: GRPOTrainer, RLOOTrainer, DPO, KTO and SFT call ``add_fused_lm_head(model, ...)``
and run the model with ``fused_lm_head=True``; that forward hands ``(hidden [N, H], lm_head weight [V, H], bias,
labels [N], temperature, chunk_size, final_logit_softcapping, logit_scale, outputs)`` to the module-level name
``trl.trainer.utils._ChunkedLogProbFunction`` (TRL's chunked log-prob autograd function), looked up at call
time. This integration replaces that one private name (the only one it touches; checked by signature) with
:class:`FusedLMHead`, which computes::

    z = logit_scale * (h @ W^T + b);  z = c * tanh(z / c) (softcap c);  s = z / temperature
    logp_n = s[n, y_n] - logsumexp(s[n])        H_n = logsumexp(s[n]) - sum_j p_nj s_nj      (fp32, [N] each)

with ``rlhf_fast.ops.linear_logprobs`` (``logit_scale`` folded into h and b; the autocast dtype, when autocast is
on, as the compute dtype, as TRL does). Calls that request the other outputs (``log_sum_sq_probs``,
``mean_logits``, ``is_top1``: DPO's and SFT's metrics) or whose head is a ZeRO-3 partitioned parameter go to
TRL's own function, counted as ``fused_lm_head_fallback``.

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
from rlhf_fast.ops.linear_logprob import linear_logprobs

__all__ = ["enable", "disable", "enabled", "call_counts", "reset_counts", "FusedLMHead", "SUPPORTED"]

SUPPORTED = ">=1.16.0,<1.17"
# The private name and the argument list of its forward, as in TRL 1.16's trl/kernels/chunked_logprob.py.
_PRIVATE = "_ChunkedLogProbFunction"
_FORWARD_ARGS = ("ctx", "hidden", "weight", "bias", "targets", "temperature", "chunk_size",
                 "final_logit_softcapping", "logit_scale", "outputs")
_OURS = {"log_probs", "entropy"}
_HELPERS = ("selective_log_softmax", "selective_log_softmax_and_entropy", "entropy_from_logits")


class FusedLMHead:
    """Stands in for TRL's ``ChunkedLogProbFunction`` where TRL's fused forward calls ``.apply``."""

    def __init__(self, original):
        self.original = original

    def apply(self, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("log_probs",)):
        """TRL's ``(logprobs, entropy, log_sum_sq_probs, mean_logits, is_top1)``; the last three are None."""
        if set(outputs) - _OURS or hasattr(weight, "ds_id"):
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
        return logp, entropy, None, None, None


def _patches() -> list[Patch]:
    import trl.kernels.chunked_logprob as chunked
    import trl.trainer.utils as utils
    original = getattr(utils, _PRIVATE, None)
    if original is not chunked.ChunkedLogProbFunction or \
            tuple(inspect.signature(original.forward).parameters) != _FORWARD_ARGS:
        raise RuntimeError(f"rlhf_fast.integrations.trl: trl.trainer.utils.{_PRIVATE} is not TRL 1.16's "
                           f"ChunkedLogProbFunction{_FORWARD_ARGS}; not patching")
    return [Patch(utils, _PRIVATE, FusedLMHead(original))] + [
        Patch(utils, name, _INTEGRATION.counted(name, getattr(compat, name))) for name in _HELPERS]


_INTEGRATION = Integration("trl", "trl", SUPPORTED, _patches)
enable, disable, enabled = _INTEGRATION.enable, _INTEGRATION.disable, _INTEGRATION.enabled
call_counts, reset_counts = _INTEGRATION.call_counts, _INTEGRATION.reset_counts
