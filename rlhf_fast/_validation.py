"""Argument checks shared by the ops: each raises ValueError/TypeError naming the argument,
before any kernel launches."""
from __future__ import annotations

from typing import Iterable

import torch


def check_tensor(name: str, x, *, floating: bool = False, ndim: int | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (fp32/bf16/fp16/fp64), got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    return x


def check_same_shape(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}")


def check_same_device(named: dict[str, torch.Tensor]) -> None:
    devices = {n: t.device for n, t in named.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")


def _checking_values() -> bool:
    """Data-dependent checks (a reduction read back to the host) run in eager mode only: under
    ``torch.compile`` a Python branch on a tensor's value breaks the graph (``fullgraph=True`` fails)."""
    return not torch.compiler.is_compiling()


def check_mask(name: str, mask, shape: torch.Size) -> torch.Tensor:
    """A bool tensor, or a numeric one holding only 0 and 1, of ``shape``; returned as bool.

    Masks select tokens, they do not weight them: a numeric mask with any other value (0.5, -1, NaN) is
    rejected with a ValueError, never silently read as 1. Bool masks need no value check (no device sync on
    CUDA: the hot path); a numeric mask costs one reduction and, on CUDA, one sync. Under ``torch.compile``
    the value check is skipped and numeric masks are read as ``mask != 0``.
    """
    check_tensor(name, mask)
    if mask.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    if not (mask.is_floating_point() or mask.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32,
                                                       torch.int64)):
        raise TypeError(f"{name} must be bool or {{0,1}} numeric, got {mask.dtype}")
    if _checking_values() and bool(((mask != 0) & (mask != 1)).any()):
        bad = mask[(mask != 0) & (mask != 1)].reshape(-1)[0].item()
        raise ValueError(f"{name} must be bool or hold only 0 and 1 (a mask selects tokens, it does not "
                         f"weight them); found {bad!r}")
    return mask != 0


def check_in_range(name: str, value: float, low: float, high: float) -> float:
    if not isinstance(value, (int, float)) or not (low <= value <= high):
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def check_positive(name: str, value: float, *, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def check_choice(name: str, value: str, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_labels(labels, shape: torch.Size, shape_name: str, vocab: int, ignore_index
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Integer token ids of ``shape`` (named ``shape_name`` in the error), each in [0, vocab) or equal to
    ``ignore_index``: ``(labels1d, bad)`` with ``labels1d`` the flattened int64 labels.

    CPU tensors in eager mode are checked here (ValueError naming the first bad id) and ``bad`` is None.
    CUDA tensors and code under ``torch.compile`` are not read back (no device sync, no graph break):
    ``bad`` is then the [N] bool tensor of out-of-range rows, which the op turns into NaN outputs with
    :func:`poison_rows` (one elementwise pass over N labels, never over the logits).
    """
    check_tensor("labels", labels)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != shape:
        raise ValueError(f"labels must have shape {shape_name} = {tuple(shape)}, got {tuple(labels.shape)}")
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    labels1d = labels.reshape(-1).long()
    bad = (labels1d != ignore_index) & ((labels1d < 0) | (labels1d >= vocab))
    if labels.device.type != "cpu" or not _checking_values():
        return labels1d, bad
    if bool(bad.any()):
        raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
                         f"found e.g. {labels1d[bad][0].item()}")
    return labels1d, None


def poison_rows(x: torch.Tensor | None, bad: torch.Tensor | None) -> torch.Tensor | None:
    """``x`` with NaN at the rows ``bad`` marks (see :func:`check_labels`); ``x`` itself when ``bad`` is None."""
    if x is None or bad is None:
        return x
    return torch.where(bad.view(x.shape), float("nan"), x)
