"""Per-token KL estimators (Schulman's k1/k2/k3) and PPO reward shaping.

With the log-ratio ``x = logp - ref_logp`` (any shape, elementwise)::

    k1  (alias "kl")          x                              grad wrt logp: 1
    k2  (alias "mse")         x^2 / 2                        grad: x
    k3  (alias "low_var_kl")  expm1(-x) + x     (>= 0)       grad: -expm1(-x)
    abs                       |x|                            grad: sign(x)
    <est>+  (e.g. "k3+")      value of <est>, gradient of k2 (straight-through, as verl's "+" suffix)

``clamp=c`` bounds the value to [-c, c]; the gradient is zero where the bound is active (as ``torch.clamp``),
except for "+" variants, whose gradient is always the unclamped k2 one. The gradient wrt ``ref_logp`` is
minus that wrt ``logp``. verl's ``low_var_kl``/``k3`` and OpenRLHF's ``k3`` are ``kl_penalty(logp, ref, "k3",
clamp=10)`` (their inner clamps of x before the exp change nothing once the value is clamped to 10).
Output fp32, computed in fp32. k3 is evaluated as ``expm1(-x) + x`` in every backend, never as
``exp(-x) + x - 1``: near x = 0 the latter loses everything but the rounding of ``exp(-x)`` (absolute error
~eps, i.e. relative ~2 eps / x^2), the former only that of ``expm1(-x) ~ -x`` (relative ~2 eps / |x|).

``shape_rewards`` builds the PPO token rewards of Ziegler et al. / InstructGPT, for ``[B, T]`` inputs::

    kl[b, t]      = KL estimate at valid tokens, 0 at masked ones
    rewards[b, t] = -kl_coef * kl[b, t]  +  clip(scores[b], -reward_clip, reward_clip) * [t == last valid of row b]

The last valid token is found per row, so left padding, right padding and gaps all work; a fully
masked row is all zeros. No gradient (rewards are targets).
"""
from __future__ import annotations

import torch

from rlhf_fast._backend import native_module, resolve_backend
from rlhf_fast._validation import (check_mask, check_positive, check_same_device, check_same_shape,
                                   check_tensor)

ESTIMATORS = ("k1", "k2", "k3", "abs")
ALIASES = {"kl": "k1", "mse": "k2", "low_var_kl": "k3"}
ESTIMATOR_IDS = {name: i for i, name in enumerate(ESTIMATORS)}   # the kernels' integer codes


def parse_estimator(estimator) -> tuple[str, bool]:
    """``"k3+"`` -> ``("k3", True)``; aliases resolved; ValueError naming ``estimator`` otherwise."""
    if isinstance(estimator, str):
        base, straight = (estimator[:-1], True) if estimator.endswith("+") else (estimator, False)
        base = ALIASES.get(base, base)
        if base in ESTIMATORS:
            return base, straight
    names = ESTIMATORS + tuple(ALIASES)
    raise ValueError(f"estimator must be one of {names}, optionally with a '+' suffix (straight-through), "
                     f"got {estimator!r}")


def _check_clamp(clamp):
    return check_positive("clamp", clamp, allow_none=True)


# ----------------------------------------------------------------------------------------- reference
def kl_value_torch(x: torch.Tensor, base: str) -> torch.Tensor:
    """The estimator's value at log-ratio ``x`` (plain autograd)."""
    if base == "k1":
        return x
    if base == "k2":
        return 0.5 * x * x
    if base == "k3":
        return torch.expm1(-x) + x
    return x.abs()


def kl_penalty_torch(logp, ref_logp, base: str, straight: bool, clamp, dtype=torch.float32):
    x = logp.to(dtype) - ref_logp.to(dtype)
    value = kl_value_torch(x, base)
    if clamp is not None:
        value = value.clamp(-clamp, clamp)
    if straight:
        k2 = 0.5 * x * x
        value = k2 - k2.detach() + value.detach()
    return value


def shape_rewards_torch(scores, logp, ref_logp, mask, kl_coef, base, reward_clip, clamp, dtype=torch.float32):
    kl = torch.where(mask, kl_penalty_torch(logp, ref_logp, base, False, clamp, dtype), 0.0)
    score = scores.to(dtype)
    if reward_clip is not None:
        score = score.clamp(-reward_clip, reward_clip)
    T = mask.shape[1]
    last = torch.where(mask, torch.arange(T, device=mask.device), -1).amax(1)    # -1: fully masked row
    at_last = torch.arange(T, device=mask.device) == last[:, None]
    rewards = -kl_coef * kl + torch.where(at_last, score[:, None], 0.0)
    return rewards, kl


# ----------------------------------------------------------------------------------------- fused path
def _kernels(backend: str):
    if backend == "native":
        return native_module().kl_forward, native_module().kl_backward, native_module().shape_rewards_forward
    from rlhf_fast.kernels import kl as k
    return k.kl_forward_triton, k.kl_backward_triton, k.shape_rewards_triton


class _KLPenalty(torch.autograd.Function):
    """Forward and backward each one fused elementwise pass of the chosen backend."""

    @staticmethod
    def forward(ctx, logp, ref_logp, est_id, straight, clamp, backend):
        forward, _, _ = _kernels(backend)
        ctx.save_for_backward(logp, ref_logp)
        ctx.args = (est_id, straight, clamp, backend)
        return forward(logp, ref_logp, est_id, clamp)

    @staticmethod
    def backward(ctx, grad):
        logp, ref_logp = ctx.saved_tensors
        est_id, straight, clamp, backend = ctx.args
        _, backward, _ = _kernels(backend)
        g_logp, g_ref = backward(grad.contiguous(), logp, ref_logp, est_id, straight, clamp, ctx.needs_input_grad[1])
        return g_logp, g_ref, None, None, None, None


# ----------------------------------------------------------------------------------------- public API
def _check_logps(logp, ref_logp):
    check_tensor("logp", logp, floating=True)
    check_tensor("ref_logp", ref_logp, floating=True)
    check_same_shape("ref_logp", ref_logp, "logp", logp)
    check_same_device({"logp": logp, "ref_logp": ref_logp})


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1", clamp: float | None = None,
               backend: str = "auto") -> torch.Tensor:
    """Per-token KL estimate, fp32 of ``logp.shape``; differentiable wrt both inputs. See the module docstring."""
    _check_logps(logp, ref_logp)
    base, straight = parse_estimator(estimator)
    clamp = _check_clamp(clamp)
    backend = resolve_backend(backend, logp)
    if backend == "torch":
        return kl_penalty_torch(logp, ref_logp, base, straight, clamp)
    return _KLPenalty.apply(logp, ref_logp, ESTIMATOR_IDS[base], straight, clamp, backend)


@torch.no_grad()
def shape_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float, estimator: str = "k1", reward_clip: float | None = None,
                  clamp: float | None = None, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``(rewards, kl)``, fp32 ``[B, T]`` each, in one fused pass. See the module docstring."""
    check_tensor("logp", logp, floating=True, ndim=2)
    _check_logps(logp, ref_logp)
    check_tensor("scores", scores, floating=True, ndim=1)
    if scores.shape[0] != logp.shape[0]:
        raise ValueError(f"scores must have shape ({logp.shape[0]},) (one per row of logp), got {tuple(scores.shape)}")
    mask = check_mask("mask", mask, logp.shape)
    check_same_device({"scores": scores, "logp": logp, "mask": mask})
    if not isinstance(kl_coef, (int, float)) or kl_coef < 0:
        raise ValueError(f"kl_coef must be a non-negative number, got {kl_coef!r}")
    base, _ = parse_estimator(estimator)     # the "+" suffix only changes gradients: irrelevant here
    reward_clip = check_positive("reward_clip", reward_clip, allow_none=True)
    clamp = _check_clamp(clamp)
    backend = resolve_backend(backend, logp)
    if backend == "torch":
        return shape_rewards_torch(scores, logp, ref_logp, mask, float(kl_coef), base, reward_clip, clamp)
    return _kernels(backend)[2](scores, logp, ref_logp, mask, float(kl_coef), ESTIMATOR_IDS[base],
                                reward_clip, clamp)
