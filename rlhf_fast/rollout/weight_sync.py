"""Bucketed weight sync: the learner's HF state dict -> a running engine, in size-capped buckets.

Plan for one sync of a model with tensors w_1..w_K (HF names, checkpoint format)::

    tensors  = state_dict minus tied lm_head, minus rotary caches; names mapped, cast to the engine dtype
    groups   = tensors grouped by decoder layer (the outermost ``.<int>.`` segment of the name:
               ``model.layers.3.*`` is one group, ``model.embed_tokens.weight`` its own)
    buckets  = consecutive groups packed while a bucket stays <= bucket_bytes
               (a group larger than bucket_bytes travels alone)
    send(bucket) once per bucket                       -> ceil(size / bucket_bytes) calls, not K

Why whole layers: vLLM stacks checkpoint tensors into fused parameters (q/k/v -> qkv_proj,
gate/up -> gate_up_proj) and its in-place reload processes a layer only when every one of its
tensors arrived in the same call; splitting a layer across calls would leave part of it stale.
vLLM's Llama loader takes HF names and does the stacking itself, so the default name map is the
identity apart from wrapper prefixes (``module.`` from DDP, ``_orig_mod.`` from torch.compile).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

NamedTensors = list[tuple[str, torch.Tensor]]

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def default_name_map(name: str) -> str | None:
    """HF parameter name -> engine checkpoint name (None: skip the tensor)."""
    for prefix in _WRAPPER_PREFIXES:
        while name.startswith(prefix):
            name = name[len(prefix):]
    if "rotary_emb." in name:  # recomputed by the engine, never loaded
        return None
    return name


def _tied(model: torch.nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return bool(getattr(cfg, "tie_word_embeddings", False))


def engine_weights(model: torch.nn.Module, dtype: torch.dtype,
                   name_map: Callable[[str], str | None] = default_name_map) -> NamedTensors:
    """The tensors to push: ``(engine name, detached tensor in dtype)``, in state-dict order.

    A tied ``lm_head.weight`` is dropped (the engine ties it to the embedding itself). Tensors already
    in ``dtype`` are not copied.
    """
    tied = _tied(model)
    out = []
    for name, t in model.state_dict().items():
        mapped = name_map(name)
        if mapped is None or (tied and mapped.endswith("lm_head.weight")):
            continue
        out.append((mapped, t.detach().to(dtype)))
    return out


def layer_key(name: str) -> str:
    """Group key: the name up to its outermost integer segment (``model.layers.3``), else the name."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[:i + 1])
    return name


def plan_buckets(named: NamedTensors, bucket_bytes: int) -> list[NamedTensors]:
    """Whole layers packed into buckets of at most ``bucket_bytes`` (see module docstring)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    groups: dict[str, NamedTensors] = {}
    for name, t in named:
        groups.setdefault(layer_key(name), []).append((name, t))
    buckets: list[NamedTensors] = []
    current: NamedTensors = []
    size = 0
    for group in groups.values():
        gsize = sum(t.numel() * t.element_size() for _, t in group)
        if current and size + gsize > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current = current + group
        size += gsize
    if current:
        buckets.append(current)
    return buckets


@dataclass
class SyncStats:
    tensors: int
    bytes: int
    calls: int
    seconds: float


def push_buckets(send: Callable[[NamedTensors], object], buckets: list[NamedTensors]) -> SyncStats:
    """Call ``send`` once per bucket; returns what moved."""
    t0 = time.perf_counter()
    for bucket in buckets:
        send(bucket)
    n = sum(len(b) for b in buckets)
    nbytes = sum(t.numel() * t.element_size() for b in buckets for _, t in b)
    return SyncStats(tensors=n, bytes=nbytes, calls=len(buckets), seconds=time.perf_counter() - t0)
