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


def check_mask(name: str, mask, shape: torch.Size) -> torch.Tensor:
    """A bool or {0,1} tensor of ``shape``; returned as bool."""
    check_tensor(name, mask)
    if mask.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() or mask.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64):
        return mask != 0
    raise TypeError(f"{name} must be bool or {{0,1}} numeric, got {mask.dtype}")


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


def check_labels(labels, shape: torch.Size, shape_name: str, vocab: int, ignore_index) -> torch.Tensor:
    """Integer token ids of ``shape`` (named ``shape_name`` in the error), each in [0, vocab) or equal to
    ``ignore_index``; returned flattened as int64."""
    check_tensor("labels", labels)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != shape:
        raise ValueError(f"labels must have shape {shape_name} = {tuple(shape)}, got {tuple(labels.shape)}")
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    labels1d = labels.reshape(-1).long()
    bad = (labels1d != ignore_index) & ((labels1d < 0) | (labels1d >= vocab))
    if bool(bad.any()):
        raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
                         f"found e.g. {labels1d[bad][0].item()}")
    return labels1d
