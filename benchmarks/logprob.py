"""Per-token log-prob (and entropy) from logits [B, T, V] (N = B * T tokens), forward and forward + backward.

    logp[n] = log_softmax(z[n] / tau)[y_n]          H[n] = -sum_j p_nj log p_nj

Cases (``-H``: log-prob and entropy; ``-fwdbwd``: plus the gradient w.r.t. the logits for per-token upstream
gradients, returned so that peak_mb excludes it):
- ``rlhf_fast``: :func:`rlhf_fast.ops.logprobs_from_logits` (one pass over the logits, online log-sum-exp).
- ``trl-selective_log_softmax``: TRL 1.16 ``trl.trainer.utils.selective_log_softmax`` (CPU: a Python loop over
  the B sequences of ``logsumexp`` + gather — on flat [N, V] logits it loops over N rows and is ~5x slower
  still; on CUDA it dispatches to TRL's own Triton kernel), with
  ``entropy_from_logits`` (128-row chunks of log_softmax) for the ``-H`` cases: what TRL's GRPO trainer calls.
- ``trl-triton`` (CUDA only): ``trl.kernels.logprob_entropy.selective_log_softmax_and_entropy``.
- ``liger-fused_selective_log_softmax`` (CUDA only, forward, log-prob only): Liger-Kernel 0.8.5
  ``liger_kernel.ops.grpo_loss.fused_selective_log_softmax``; it scores positions 0..T-2 of each sequence
  (its [B, L+1, V] convention), one row per sequence fewer than the others.
- ``naive``: ``log_softmax(z / tau).gather(...)`` (and ``-(p * log p).sum()``) with autograd.

bytes_moved: forward = the logits read once + labels + fp32 outputs; forward + backward adds one more read of
the logits and one write of dlogits (the fused backward's minimum; a backward that keeps softmax needs more).
"""
from __future__ import annotations

import torch

from benchmarks.harness import Case
from rlhf_fast.ops import logprobs_from_logits


def _inputs(N: int, V: int, dtype: torch.dtype, device: str, grad: bool):
    """logits [B, T, V] with T = 1024 tokens per sequence (N = B * T), the layout the trainers pass."""
    T = min(N, 1024)
    shape = (N // T, T)

    def make():
        g = torch.Generator(device="cpu").manual_seed(0)
        logits = (torch.randn(*shape, V, generator=g) * 2).to(device, dtype)
        return {"logits": logits.requires_grad_(grad), "labels": torch.randint(0, V, shape, generator=g).to(device),
                "g_logp": torch.randn(shape, generator=g).to(device),
                "g_entropy": torch.randn(shape, generator=g).to(device)}
    return make


def _naive(z, y):
    log_p = torch.log_softmax(z.float(), dim=-1)
    return log_p.gather(-1, y.unsqueeze(-1)).squeeze(-1), -(log_p.exp() * log_p).sum(-1)


def _impls(device: str, entropy: bool) -> dict:
    """name -> f(logits, labels) returning (logp, entropy or None)."""
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    out = {"rlhf_fast": lambda z, y: logprobs_from_logits(z, y, return_entropy=True) if entropy
           else (logprobs_from_logits(z, y), None),
           "trl-selective_log_softmax": lambda z, y: (selective_log_softmax(z, y),
                                                      entropy_from_logits(z) if entropy else None),
           "naive": lambda z, y: _naive(z, y) if entropy else (_naive(z, y)[0], None)}
    if device == "cuda":
        try:
            from trl.kernels.logprob_entropy import selective_log_softmax_and_entropy
            out["trl-triton"] = lambda z, y: selective_log_softmax_and_entropy(z, y)
        except ImportError:
            pass
    return out


def _forward(fn):
    @torch.no_grad()
    def run(x):
        return fn(x["logits"], x["labels"])
    return run


def _forward_backward(fn):
    def run(x):
        logp, entropy = fn(x["logits"], x["labels"])
        outs, grads = [logp], [x["g_logp"]]
        if entropy is not None:
            outs.append(entropy), grads.append(x["g_entropy"])
        (dlogits,) = torch.autograd.grad(outs, x["logits"], grads)
        return [o.detach() for o in outs] + [dlogits]
    return run


def _liger():
    try:
        from liger_kernel.ops.grpo_loss import fused_selective_log_softmax
    except ImportError:
        return {}
    return {"liger-fused_selective_log_softmax":
            lambda x: fused_selective_log_softmax(x["logits"], x["labels"], 1.0)}


def cases(quick: bool, device: str) -> list[Case]:
    if quick:
        plan = [(8192, 32000, torch.float32, False, False), (8192, 32000, torch.float32, True, True)]
    else:
        dtypes = [torch.float32] if device == "cpu" else [torch.bfloat16, torch.float32]
        plan = [(N, V, dt, H, bwd) for dt in dtypes for H, bwd in ((False, False), (True, False), (True, True))
                for N, V in ((8192, 32000), (2048, 128000), (2048, 151936))]
        plan += [(N, 32000, torch.float32, False, False) for N in (1024, 4096, 16384)]  # scaling in N
    out = []
    for N, V, dtype, entropy, backward in plan:
        size = torch.finfo(dtype).bits // 8
        wrap = _forward_backward if backward else _forward
        impls = {name: wrap(fn) for name, fn in _impls(device, entropy).items()}
        if device == "cuda" and not entropy and not backward:
            impls.update(_liger())
        suffix = ("" if dtype == torch.float32 else f"-{str(dtype)[6:]}") + ("-H" if entropy else "") \
            + ("-fwdbwd" if backward else "")
        out.append(Case(name=f"N{N}xV{V}{suffix}", make_inputs=_inputs(N, V, dtype, device, backward), impls=impls,
                        bytes_moved=(3 if backward else 1) * N * V * size + 8 * N + 4 * N * (1 + entropy),
                        tokens=N, min_reps=3, budget_s=1.0 if quick else 5.0))
    return out
