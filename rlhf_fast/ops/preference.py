"""Preference-optimisation losses over sequence log-probs: DPO (sigmoid, with cDPO label smoothing), IPO,
SimPO and hinge. Inputs are per-pair sums over completion tokens, all ``[B]``::

    logp_c, logp_r          log pi(y_c | x), log pi(y_r | x)         (sum of token log-probs)
    ref_c, ref_r            the same under the frozen reference      (not used by SimPO)
    len_c, len_r            completion lengths in tokens             (IPO and SimPO)

Every loss is ``mean_b f(z_b)`` of one scalar ``z`` per pair::

    sigmoid (DPO, Rafailov et al. 2023)   z = beta * ((logp_c - ref_c) - (logp_r - ref_r))
                                          f = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)   eps: cDPO smoothing
    hinge (SLiC-style)                    z as sigmoid,  f = max(0, 1 - z)
    ipo (Azar et al. 2023)                z = (logp_c - ref_c) / len_c - (logp_r - ref_r) / len_r
                                          f = (z - 1 / (2 beta))^2
    simpo (Meng et al. 2024)              z = beta * (logp_c / len_c - logp_r / len_r) - gamma
                                          f as sigmoid (eps smoothing too), no reference

IPO's log-ratios are averaged per token as TRL does (the IPO authors' normalisation; the paper writes sums).
The backward is closed-form, ``dL/dz_b = f'(z_b) / B`` with::

    sigmoid, simpo   f'(z) = sigmoid(z) - (1 - eps)        hinge  f'(z) = -1[z < 1]
    ipo              f'(z) = 2 (z - 1 / (2 beta))

and ``dz/dlogp_c = beta * a_c``, ``dz/dlogp_r = -beta * a_r`` (``a = 1`` or ``1 / len``; IPO's ``beta``
factor is 1), the same with the opposite sign for the reference. Implicit rewards for the logs, as TRL's
``rewards/*``: ``beta * (logp - ref)`` (SimPO: ``beta * logp / len``); accuracy: chosen reward > rejected.
Everything accumulates in fp32 (fp64 inputs stay fp64).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf_fast._validation import check_choice, check_in_range, check_positive, check_same_device, check_tensor

__all__ = ["LOSS_TYPES", "preference_loss", "needs_reference"]

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")


def needs_reference(loss_type: str) -> bool:
    """Whether ``loss_type`` uses the reference log-probs (all but SimPO)."""
    return check_choice("loss_type", loss_type, LOSS_TYPES) != "simpo"


def _f_and_grad(z: torch.Tensor, loss_type: str, beta: float, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair loss f(z) and its derivative f'(z) (module docstring)."""
    if loss_type == "hinge":
        return torch.relu(1 - z), -(z < 1).to(z.dtype)
    if loss_type == "ipo":
        d = z - 1 / (2 * beta)
        return d * d, 2 * d
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z), torch.sigmoid(z) - (1 - eps)


class _PreferenceLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, terms, coef, shift, loss_type, beta, eps):
        # terms: [4, B] (logp_c, logp_r, ref_c, ref_r); coef: [4, B] dz/d(term); z = sum_k coef_k * term_k + shift
        z = (coef * terms).sum(0) + shift
        f, fprime = _f_and_grad(z, loss_type, beta, eps)
        ctx.save_for_backward(fprime, coef)
        return f.mean()

    @staticmethod
    def backward(ctx, g):
        fprime, coef = ctx.saved_tensors
        return coef * (g * fprime / fprime.numel()), None, None, None, None, None


def _as_float(name: str, x, like: torch.Tensor | None) -> torch.Tensor:
    check_tensor(name, x, floating=True, ndim=1)
    if like is not None and x.shape != like.shape:
        raise ValueError(f"{name} must have the shape of chosen_logps {tuple(like.shape)}, got {tuple(x.shape)}")
    return x


def preference_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
                    ref_chosen_logps: torch.Tensor | None = None, ref_rejected_logps: torch.Tensor | None = None,
                    chosen_lengths: torch.Tensor | None = None, rejected_lengths: torch.Tensor | None = None, *,
                    loss_type: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
                    gamma: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean preference loss over B pairs, and TRL-style statistics (module docstring for the formulas).

    Args:
        chosen_logps, rejected_logps: [B] float, sequence log-probs under the policy (gradients flow).
        ref_chosen_logps, ref_rejected_logps: [B] float, the reference's (required unless ``simpo``; no gradient).
        chosen_lengths, rejected_lengths: [B] completion token counts (> 0), required by ``ipo`` and ``simpo``.
        loss_type: ``sigmoid`` | ``hinge`` | ``ipo`` | ``simpo``.
        beta: positive temperature (IPO: the regulariser tau).
        label_smoothing: cDPO's eps in [0, 0.5), for ``sigmoid`` and ``simpo``.
        gamma: SimPO's target margin.
    Returns:
        (loss [] fp32, stats): ``rewards/chosen``, ``rewards/rejected`` [B], ``rewards/margins`` [B],
        ``rewards/accuracies`` [B] float (all detached).
    """
    check_choice("loss_type", loss_type, LOSS_TYPES)
    beta = check_positive("beta", beta)
    eps = check_in_range("label_smoothing", label_smoothing, 0.0, 0.5)
    if eps == 0.5:
        raise ValueError("label_smoothing must be < 0.5 (0.5 makes chosen and rejected interchangeable)")
    if eps and loss_type not in ("sigmoid", "simpo"):
        raise ValueError(f"label_smoothing applies to loss_type 'sigmoid' or 'simpo', not {loss_type!r}")
    if gamma and loss_type != "simpo":
        raise ValueError(f"gamma applies to loss_type 'simpo', not {loss_type!r}")
    _as_float("chosen_logps", chosen_logps, None)
    _as_float("rejected_logps", rejected_logps, chosen_logps)
    dtype = torch.float64 if chosen_logps.dtype == torch.float64 else torch.float32
    B = chosen_logps.shape[0]
    if B == 0:
        raise ValueError("chosen_logps must hold at least one pair, got shape (0,)")
    zeros = chosen_logps.new_zeros(B, dtype=dtype)
    refs = []
    for name, ref in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        if loss_type == "simpo":
            refs.append(zeros)
            continue
        if ref is None:
            raise ValueError(f"{name} is required for loss_type {loss_type!r} (only 'simpo' has no reference)")
        refs.append(_as_float(name, ref, chosen_logps).detach().to(dtype))
    scale = []
    for name, n in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        if loss_type not in ("ipo", "simpo"):
            scale.append(zeros + 1)
            continue
        if n is None:
            raise ValueError(f"{name} is required for loss_type {loss_type!r} (length normalisation)")
        check_tensor(name, n, ndim=1)
        if n.shape != chosen_logps.shape or bool((n <= 0).any()):
            raise ValueError(f"{name} must be [B] = {tuple(chosen_logps.shape)} positive token counts, "
                             f"got shape {tuple(n.shape)}")
        scale.append(1.0 / n.to(dtype))
    check_same_device({"chosen_logps": chosen_logps, "rejected_logps": rejected_logps, "ref": refs[0],
                       "lengths": scale[0]})

    b = 1.0 if loss_type == "ipo" else beta
    coef = torch.stack([b * scale[0], -b * scale[1], -b * scale[0], b * scale[1]])     # dz / d(term)
    terms = torch.stack([chosen_logps.to(dtype), rejected_logps.to(dtype), refs[0], refs[1]])
    loss = _PreferenceLoss.apply(terms, coef, -float(gamma), loss_type, beta, eps)

    norm = scale if loss_type == "simpo" else (1.0, 1.0)
    chosen_r = beta * norm[0] * (chosen_logps.detach().to(dtype) - refs[0])
    rejected_r = beta * norm[1] * (rejected_logps.detach().to(dtype) - refs[1])
    stats = {"rewards/chosen": chosen_r, "rewards/rejected": rejected_r, "rewards/margins": chosen_r - rejected_r,
             "rewards/accuracies": (chosen_r > rejected_r).to(dtype)}
    return loss, stats

