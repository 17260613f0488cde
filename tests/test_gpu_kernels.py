"""Every kernel on a CUDA GPU (backend="auto": Triton, and the CUDA GAE of csrc/cuda/ when built) against the
float64 torch references, with fresh random inputs each run (the seed is printed; RLHF_FAST_SEED repeats one),
bf16 and fp32, awkward shapes and more than 65,536 rows. Run by scripts/gpu_check.sh; skipped without a GPU.

Tolerances: inputs are upcast exactly and computed in fp32, so values are within fp32 rounding of the float64
reference on the same (rounded) inputs: 1e-5 relative for the elementwise and row ops (2e-5 after a reduction
over a row), gradients within one ulp of their dtype. The lm_head: bf16 products are exact in the fp32
accumulator, so H-term dot products carry ~1e-6 relative error; tf32 (allow_tf32) rounds operands to 10 bits:
the kernel docstring's measured ~1e-3 nats.
"""
import os
import time

import pytest
import torch

from rlhf_fast.ops import (gae, kl_penalty, linear_logprobs, logprobs_from_logits, masked_mean, masked_var,
                           ppo_policy_loss, ppo_value_loss, shape_rewards)
from rlhf_fast.ops.gae import gae_torch
from rlhf_fast.ops.kl import kl_penalty_torch, shape_rewards_torch
from rlhf_fast.ops.policy_loss import policy_loss_torch
from rlhf_fast.ops.value_loss import value_loss_torch

# RLHF_FAST_GPU_TESTS_ON_CPU=1: a dry run of this file on CPU tensors (Triton under the interpreter), to check
# the tests themselves where there is no GPU; slow for the > 65,536-row cases.
ON_CPU = os.environ.get("RLHF_FAST_GPU_TESTS_ON_CPU") == "1"
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not (torch.cuda.is_available() or ON_CPU), reason="needs a CUDA GPU")]
DEV = "cuda" if torch.cuda.is_available() else "cpu"
BACKEND = "auto" if DEV == "cuda" else "triton"              # auto: what users get on a GPU
DTYPES = [torch.float32, torch.bfloat16]
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2**-7}      # one bf16 ulp: the gradient's own rounding
MANY = 70_001                        # > 65,536 rows: a 1-D grid's y/z limit would break here


@pytest.fixture(autouse=True)
def _fresh_seed():
    seed = int(os.environ.get("RLHF_FAST_SEED", time.time_ns() % 2**31))
    torch.manual_seed(seed)
    print(f"RLHF_FAST_SEED={seed}")


def _close(got, want, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(got.detach().double().cpu(), want.detach().double().cpu(), rtol=rtol, atol=atol)


def _mask(B, T):
    m = torch.rand(B, T, device=DEV) < 0.8
    m[0] = False                      # a fully masked row
    return m


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("estimator", ["k1", "k3", "k3+"])
def test_gpu_kl_penalty(dtype, estimator):
    logp = (torch.randn(MANY, 3, device=DEV) * 0.5).to(dtype).requires_grad_()
    ref = (torch.randn(MANY, 3, device=DEV) * 0.5).to(dtype)
    out = kl_penalty(logp, ref, estimator, backend=BACKEND)
    out.backward(torch.ones_like(out))
    lp64 = logp.detach().double().requires_grad_()
    want = kl_penalty_torch(lp64, ref.double(), estimator.rstrip("+"), estimator.endswith("+"), None, torch.float64)
    want.backward(torch.ones_like(want))
    _close(out, want)
    _close(logp.grad, lp64.grad.to(dtype), rtol=GRAD_RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T", [(MANY, 3), (5, 4099), (1, 1)])
def test_gpu_shape_rewards_and_gae(dtype, B, T):
    logp, ref = (torch.randn(B, T, device=DEV).to(dtype) for _ in range(2))
    scores, m = torch.randn(B, device=DEV), _mask(B, T)
    rewards, kl = shape_rewards(scores, logp, ref, m, 0.05, "k3", reward_clip=2.0, backend=BACKEND)
    want_r, want_kl = shape_rewards_torch(scores, logp, ref, m, 0.05, "k3", 2.0, None, torch.float64)
    _close(rewards, want_r)
    _close(kl, want_kl)
    values = torch.randn(B, T, device=DEV).to(dtype)
    adv, ret = gae(rewards, values, m, gamma=0.99, lam=0.95, backend=BACKEND)
    want_a, want_ret = gae_torch(rewards.double(), values.double(), m, 0.99, 0.95, torch.float64)
    _close(adv, want_a, rtol=2e-5, atol=2e-5)
    _close(ret, want_ret, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_masked_stats(dtype):
    x, m = (torch.randn(MANY, 3, device=DEV) * 3 + 100).to(dtype), _mask(MANY, 3)
    v = x.double()[m]
    _close(masked_mean(x, m, backend=BACKEND), v.mean(), rtol=1e-6)
    _close(masked_var(x, m, backend=BACKEND), v.var(), rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T", [(MANY, 3), (3, 5000)])
def test_gpu_policy_and_value_losses(dtype, B, T):
    logp = (torch.randn(B, T, device=DEV) * 0.3 - 1).to(dtype).requires_grad_()
    old = (logp.detach().float() + 0.1 * torch.randn(B, T, device=DEV)).to(dtype)
    adv, m = torch.randn(B, T, device=DEV), _mask(B, T)
    loss, _ = ppo_policy_loss(logp, old, adv, m, clip_low=0.2, clip_high=0.28, dual_clip=3.0, backend=BACKEND)
    loss.backward()
    lp64 = logp.detach().double().requires_grad_()
    want = policy_loss_torch(lp64, old.double(), adv.double(), m, 0.2, 0.28, 3.0, dtype=torch.float64)[0]
    want.backward()
    _close(loss, want)
    _close(logp.grad, lp64.grad.to(dtype), rtol=GRAD_RTOL[dtype], atol=1e-9)
    values = torch.randn(B, T, device=DEV).to(dtype).requires_grad_()
    vloss, _ = ppo_value_loss(values, old, adv, m, clip=0.2, backend=BACKEND)
    vloss.backward()
    v64 = values.detach().double().requires_grad_()
    vwant = value_loss_torch(v64, old.double(), adv.double(), m, 0.2, dtype=torch.float64)[0]
    vwant.backward()
    _close(vloss, vwant)
    _close(values.grad, v64.grad.to(dtype), rtol=GRAD_RTOL[dtype], atol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,V", [(MANY, 50), (64, 128_256), (3, 1)])
def test_gpu_logprobs_from_logits(dtype, N, V):
    logits = (torch.randn(N, V, device=DEV) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), device=DEV)
    labels[::7] = -100
    logp, ent = logprobs_from_logits(logits, labels, temperature=0.7, return_entropy=True, backend=BACKEND)
    (logp.sum() + 0.5 * ent.sum()).backward()
    l64 = logits.detach().double().requires_grad_()
    wlogp, went = logprobs_from_logits(l64, labels, temperature=0.7, return_entropy=True, backend="torch")
    (wlogp.sum() + 0.5 * went.sum()).backward()
    _close(logp, wlogp, rtol=2e-5, atol=2e-5)
    _close(ent, went, rtol=2e-5, atol=2e-5)
    _close(logits.grad, l64.grad.to(dtype), rtol=GRAD_RTOL[dtype], atol=1e-5)


@pytest.mark.parametrize("dtype,tf32,tol", [(torch.float32, False, 1e-4), (torch.bfloat16, False, 1e-4),
                                            (torch.float32, True, 5e-3)])
@pytest.mark.parametrize("N,H,V", [(MANY, 64, 1000), (100, 100, 50_257)])
def test_gpu_linear_logprobs(dtype, tf32, tol, N, H, V):
    hidden = torch.randn(N, H, device=DEV).to(dtype)
    weight = (torch.randn(V, H, device=DEV) / H**0.5).to(dtype)
    labels = torch.randint(0, V, (N,), device=DEV)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        logp, ent = linear_logprobs(hidden, weight, labels, return_entropy=True, backend=BACKEND)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    wlogp, went = linear_logprobs(hidden.double(), weight.double(), labels, return_entropy=True, backend="torch")
    _close(logp, wlogp, rtol=tol, atol=tol)
    _close(ent, went, rtol=tol, atol=tol)
