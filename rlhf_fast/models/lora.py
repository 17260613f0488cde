"""LoRA policies through ``peft``: wrap, use the base as the reference, sync merged weights into vLLM.

A LoRA-adapted linear layer computes ``y = x W^T + s * x A^T B^T`` with ``A`` [r, in], ``B`` [out, r] and
``s = alpha / r`` (peft's ``LoraConfig(r, lora_alpha, target_modules)``); only A and B train.

- :func:`apply_lora`: ``peft.get_peft_model`` with ``target_modules="all-linear"`` by default, which leaves
  the lm_head out. The head is never adapted: the fused lm_head path
  (:func:`rlhf_fast.models.policy_logprobs`) reads the head's weight directly, so naming it in the targets is
  refused rather than silently ignored.
- :func:`maybe_lora` also takes a reward model / critic (:class:`~rlhf_fast.models.value_model.ScalarHeadModel`):
  its backbone gets the adapter and its scalar head stays fully trainable (what peft's ``modules_to_save``
  does for a sequence-classification head); :func:`merged_model` merges the backbone back for saving.
- :func:`reference_mode`: the reference policy of DPO/PPO is the base model, i.e. the same module with the
  adapter disabled (``PeftModel.disable_adapter()``): no second copy of the weights.
- :func:`merged_lora_weights`: what a rollout engine needs after an update: ``W + s * B A`` for every adapted
  layer, with HF names, and nothing for the layers LoRA does not touch (embeddings, norms, head). Every tensor
  of a changed decoder layer travels (merged or not): vLLM stacks q/k/v and gate/up into fused parameters and
  reloads a layer correctly only when all its tensors arrive together.
- :func:`sync_lora`: those tensors through the engine's own bucketed sync (``VLLMEngine.sync_weights`` sends
  them for any peft model: ``plan_buckets`` / ``push_buckets``, i.e. vLLM ``reload_weights``), not vLLM's LoRA
  adapter loading (which the CPU backend here does not run).
"""
from __future__ import annotations

import contextlib
import sys

import torch

from rlhf_fast.rollout.weight_sync import NamedTensors, SyncStats, default_name_map, layer_key

__all__ = ["apply_lora", "is_lora", "maybe_lora", "merged_lora_weights", "merged_model", "reference_mode",
           "sync_lora"]


def is_lora(model) -> bool:
    """Whether ``model`` is a peft model (peft is only imported by the code that wraps one)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def apply_lora(model: torch.nn.Module, rank: int, alpha: float | None = None, targets: str = "all-linear",
               dropout: float = 0.0, task_type: str = "CAUSAL_LM"):
    """``model`` wrapped by peft LoRA of rank ``rank`` (alpha defaults to 2 * rank); ``targets``: ``all-linear``
    or comma-separated module names (``q_proj,v_proj``); ``task_type``: peft's (``FEATURE_EXTRACTION`` for a
    backbone without a head)."""
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"lora rank must be a positive int, got {rank!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora dropout must be in [0, 1), got {dropout!r}")
    from peft import LoraConfig, get_peft_model
    names = "all-linear" if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    if not names:
        raise ValueError(f"lora targets must be 'all-linear' or comma-separated module names, got {targets!r}")
    head = model.get_output_embeddings()
    head_names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is head}
    if names != "all-linear" and head_names & set(names):
        raise ValueError(f"lora targets {sorted(head_names & set(names))}: the lm_head cannot be adapted (the fused "
                         f"lm_head path reads its weight directly); adapt the decoder layers instead")
    config = LoraConfig(r=rank, lora_alpha=float(alpha if alpha is not None else 2 * rank), target_modules=names,
                        lora_dropout=dropout, bias="none", task_type=task_type)
    return get_peft_model(model, config)


def maybe_lora(model: torch.nn.Module, section):
    """``model`` itself when ``section.rank == 0``, else :func:`apply_lora` with the section's settings (a
    scalar-head model: on its backbone, in place, the head left trainable)."""
    if not section.rank:
        return model
    from rlhf_fast.models.value_model import ScalarHeadModel
    if isinstance(model, ScalarHeadModel):
        model.backbone = apply_lora(model.backbone, section.rank, section.alpha, section.targets, section.dropout,
                                    task_type="FEATURE_EXTRACTION")
        return model
    return apply_lora(model, section.rank, section.alpha, section.targets, section.dropout)


def merged_model(model):
    """A plain model to save: a LoRA model's adapter merged into its base (in place; a scalar-head model's
    backbone), else ``model``."""
    from rlhf_fast.models.value_model import ScalarHeadModel
    if isinstance(model, ScalarHeadModel):
        model.backbone = merged_model(model.backbone)
        return model
    return model.merge_and_unload() if is_lora(model) else model


def reference_mode(model):
    """Context in which ``model`` computes the reference policy: adapter disabled for a LoRA model, else as is."""
    return model.disable_adapter() if is_lora(model) else contextlib.nullcontext()


@torch.no_grad()
def merged_lora_weights(model, dtype: torch.dtype) -> NamedTensors:
    """``(HF name, tensor in dtype)`` for every tensor of the decoder layers LoRA changes, adapted weights merged
    (``W + s * B A`` over the active adapters); see the module docstring."""
    if not is_lora(model):
        raise TypeError(f"model must be a peft LoRA model, got {type(model).__name__}")
    from peft.tuners.lora import LoraLayer
    base = model.get_base_model()
    merged: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and not module.merged:
            adapters = [a for a in module.active_adapters if a in module.lora_A]
            if adapters:
                weight = module.get_base_layer().weight
                merged[f"{name}.weight"] = weight + sum(module.get_delta_weight(a) for a in adapters)
    changed = {layer_key(n) for n in merged}
    out = []
    for name, t in base.state_dict().items():
        if ".lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        mapped = default_name_map(name)
        if mapped is not None and layer_key(name) in changed:
            out.append((mapped, merged.get(name, t).detach().to(dtype)))
    return out


def sync_lora(engine, model) -> SyncStats:
    """Push a LoRA policy's merged changed layers into a :class:`~rlhf_fast.rollout.VLLMEngine` (``reload``
    transfer) in its buckets, then reset vLLM's prefix cache. Returns what moved."""
    if getattr(engine, "weight_transfer", None) != "reload":
        raise ValueError("sync_lora needs a VLLMEngine with weight_transfer='reload'")
    if not is_lora(model):
        raise TypeError(f"model must be a peft LoRA model, got {type(model).__name__}")
    engine.sync_weights(model)
    return engine.last_sync
