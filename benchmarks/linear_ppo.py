"""The PPO/GRPO objective from hidden states, forward + backward (gradients for hidden and weight).

    logp = log_softmax(h @ W^T)[y]      loss = token-mean over the B x T tokens of max(-A r, -A clamp(r, 0.8, 1.2))
    r = exp(logp - old_logp); h [B, T, H], W [V, H]; one advantage per sequence (GRPO), no entropy or KL term

Implementations (each returns loss, dh, dW, so peak_mb excludes the gradients):
- ``rlhf_fast``: :func:`rlhf_fast.ops.linear_ppo_objective`: blocks of whole-vocabulary logits (``default_block_rows``), the
  gradients computed in the forward (6 N H V FLOPs), the backward a scale of them.
- ``naive``: the unfused objective: ``h @ W^T`` -> log_softmax -> gather -> the clipped loss (the torch reference
  of ``ppo_policy_loss``) -> autograd, with the whole [N, V] logits (and their gradient) in memory.
- ``liger-grpo``: Liger-Kernel 0.8.5 ``LigerFusedLinearGRPOLoss`` (beta 0, loss_type "dapo" = token-mean,
  eager: ``compiled=False``, its default chunk of one sequence), whose backward recomputes the logits.
- ``trl-chunked``: TRL 1.16's chunked lm_head log-prob (``trl.kernels.ChunkedLogProbFunction``, 32768 vocabulary
  columns, as in benchmarks/linear_logprob.py) + the same torch loss + autograd (recomputing backward).

flops = 6 N H V (the forward matmul and the two gradient matmuls); recomputing paths do 8 N H V.
bytes_moved = the inputs read and the gradients written once. The target for peak_mb is 10% of one fp32 [N, V].
"""
from __future__ import annotations

import math

import torch

from benchmarks.harness import Case
from benchmarks.linear_logprob import _peers as logprob_peers
from rlhf_fast.ops import linear_ppo_objective
from rlhf_fast.ops.policy_loss import policy_loss_torch

CLIP = 0.2
SEQ_LEN = 1024


def _inputs(B, T, H, V, dtype, device):
    def make():
        g = torch.Generator(device="cpu").manual_seed(0)
        adv = torch.randn(B, generator=g)
        return {"hidden": torch.randn(B, T, H, generator=g).to(device, dtype).requires_grad_(),
                "weight": (torch.randn(V, H, generator=g) / H ** 0.5).to(device, dtype).requires_grad_(),
                "labels": torch.randint(0, V, (B, T), generator=g).to(device),
                # logits ~ N(0, 1): logp ~ -log V - 1/2; old log-probs around it give ratios on both sides of the clip
                "old": (-math.log(V) - 0.5 + 0.3 * torch.randn(B, T, generator=g)).to(device),
                "adv_seq": adv.to(device), "adv": adv[:, None].expand(B, T).contiguous().to(device),
                "mask": torch.ones(B, T, dtype=torch.bool, device=device)}
    return make


def _torch_loss(logp, x):
    return policy_loss_torch(logp, x["old"], x["adv"], x["mask"], CLIP, CLIP)[0]


def _with_grads(loss_fn):
    def run(x):
        loss = loss_fn(x)
        dh, dw = torch.autograd.grad(loss, (x["hidden"], x["weight"]))
        return loss.detach(), dh, dw
    return run


def _ours(x):
    return linear_ppo_objective(x["hidden"], x["weight"], x["labels"], x["old"], x["adv"], x["mask"],
                                clip_low=CLIP, clip_high=CLIP)[0]


def _naive(x):
    logits = (x["hidden"] @ x["weight"].t()).float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, x["labels"].unsqueeze(-1)).squeeze(-1)
    return _torch_loss(logp, x)


def _peer_impls() -> dict:
    out = {}
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        liger = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, compiled=False, loss_type="dapo",
                                         epsilon_low=CLIP, epsilon_high=CLIP)
        out["liger-grpo"] = lambda x: liger(x["hidden"], x["weight"], x["labels"], x["mask"].long(), x["adv_seq"],
                                            old_per_token_logps=x["old"])[0]
    except ImportError:
        pass
    trl = logprob_peers().get("trl-chunked")
    if trl is not None:
        def trl_loss(x):
            B, T, H = x["hidden"].shape
            logp = trl(x["hidden"].reshape(B * T, H), x["weight"], x["labels"].reshape(-1)).view(B, T)
            return _torch_loss(logp, x)
        out["trl-chunked"] = trl_loss
    return out


def cases(quick: bool, device: str) -> list[Case]:
    shapes = [(2048, 512, 128000)] if quick else [(8192, 2048, 32000), (2048, 512, 128000)]
    dtypes = [torch.float32] if device == "cpu" else [torch.bfloat16, torch.float32]
    out = []
    for N, H, V in shapes:
        for dtype in dtypes:
            impls = {"rlhf_fast": _with_grads(_ours), "naive": _with_grads(_naive),
                     **{k: _with_grads(f) for k, f in _peer_impls().items()}}
            size = torch.finfo(dtype).bits // 8
            suffix = "" if dtype == torch.float32 else f"-{str(dtype)[6:]}"
            out.append(Case(name=f"N{N}xH{H}xV{V}{suffix}", make_inputs=_inputs(N // SEQ_LEN, SEQ_LEN, H, V, dtype, device),
                            impls=impls, tokens=N, flops=6.0 * N * H * V,
                            bytes_moved=2 * (N * H + V * H) * size + 16 * N,
                            min_reps=2 if quick else 3, budget_s=0.0 if quick else 10.0))
    return out
