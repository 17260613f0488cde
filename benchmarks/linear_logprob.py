"""Log-prob from hidden states through the lm_head, forward + backward (grads for hidden and weight).

    logp[n] = log_softmax(h @ W^T)[n, y_n]        h [N, H], W [V, H]; upstream grad g [N]

Implementations (each returns logp, dh, dW so peak_mb excludes them):
- ``rlhf_fast``: :func:`rlhf_fast.ops.linear_logprobs` (tiles of 1024 tokens x 16384 vocabulary entries on
  CPU; the logits never whole).
- ``naive``: ``(h @ W.T).log_softmax(-1).gather(...)`` + autograd (the unfused baseline).
- ``trl-chunked``: TRL 1.16 ``trl.kernels.ChunkedLogProbFunction`` (its CPU path: torch tiles of 4096 tokens
  x 32768 vocabulary columns, TRL's default width in ``trl.trainer.utils``).
- ``liger-chunked``: Liger-Kernel 0.8.5 ``_ChunkedSelectiveLogProbFunction`` (the selective log-prob of its
  fused-linear PPO/GRPO losses; pure torch, 2048 tokens x 4096 vocabulary columns).

flops = 2NHV (forward) + 4NHV (backward dh, dW) — the useful work; recomputing backwards do 2NHV more.
bytes_moved = the inputs read and the gradients written once.
"""
from __future__ import annotations

import torch

from benchmarks.harness import Case
from rlhf_fast.ops import linear_logprobs


def _inputs(N, H, V, dtype, device):
    def make():
        g = torch.Generator(device="cpu").manual_seed(0)
        return {"hidden": torch.randn(N, H, generator=g).to(device, dtype).requires_grad_(),
                "weight": (torch.randn(V, H, generator=g) / H ** 0.5).to(device, dtype).requires_grad_(),
                "labels": torch.randint(0, V, (N,), generator=g).to(device),
                "grad": torch.randn(N, generator=g).to(device)}
    return make


def _fwd_bwd(logp_fn):
    def run(x):
        logp = logp_fn(x["hidden"], x["weight"], x["labels"])
        dh, dw = torch.autograd.grad(logp, (x["hidden"], x["weight"]), grad_outputs=x["grad"])
        return logp.detach(), dh, dw
    return run


def _naive(h, w, y):
    return torch.log_softmax((h @ w.t()).float(), dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


def _peers() -> dict:
    out = {}
    try:
        from trl.kernels import ChunkedLogProbFunction
        out["trl-chunked"] = lambda h, w, y: ChunkedLogProbFunction.apply(h, w, None, y, 1.0, 32768, None, 1.0, ())[0]
    except ImportError:
        pass
    try:
        from liger_kernel.chunked_loss.fused_linear_ppo import _ChunkedSelectiveLogProbFunction
        out["liger-chunked"] = lambda h, w, y: _ChunkedSelectiveLogProbFunction.apply(h, w, y, None, 1.0, 4096)
    except ImportError:
        pass
    return out


def cases(quick: bool, device: str) -> list[Case]:
    shapes = [(2048, 512, 128000)] if quick else [(2048, 512, 128000), (4096, 1024, 151936), (8192, 2048, 32000)]
    dtypes = [torch.float32] if device == "cpu" else [torch.bfloat16, torch.float32]
    out = []
    for N, H, V in shapes:
        for dtype in dtypes:
            impls = {"rlhf_fast": _fwd_bwd(lambda h, w, y: linear_logprobs(h, w, y)),
                     "naive": _fwd_bwd(_naive),
                     **{k: _fwd_bwd(f) for k, f in _peers().items()}}
            size = torch.finfo(dtype).bits // 8
            suffix = "" if dtype == torch.float32 else f"-{str(dtype)[6:]}"
            out.append(Case(name=f"N{N}xH{H}xV{V}{suffix}", make_inputs=_inputs(N, H, V, dtype, device),
                            impls=impls, tokens=N, flops=6.0 * N * H * V,
                            bytes_moved=2 * (N * H + V * H) * size + 8 * N,
                            min_reps=2 if quick else 3, budget_s=0.0 if quick else 10.0))
    return out
