"""The memory plan of a distributed run, built on the meta device (no weights, no GPU), per rank.

The models are instantiated from their HF config on ``torch.device("meta")``; FSDP2 shards every parameter along
dim 0 into W pieces (padded), so a rank holds ``sum_p ceil(p.shape[0] / W) * prod(p.shape[1:])`` elements of a
model, ``Pr`` below. With ``b`` bytes per parameter element (2 for bf16, 4 for fp32), per learner rank::

    policy params      Pr * b
    policy grads       Pr * b                                  (reduce-scattered: a shard, like the params)
    AdamW state        Pr * 8      (fp32 m, v)   + Pr * 4 fp32 master weights when b < 4
    reference          Pr_ref * b                              (frozen, sharded; only with a KL term)
    critic             params + grads + AdamW as the policy    (gae only; the policy backbone + a scalar head)
    gathered layer     2 * max_layer * b                       (FSDP2 all-gathers one layer, prefetches the next)
    activations        with activation checkpointing:  L * t * H * b  (each layer's input)  + 34 * t * H * b
                       (one layer's recompute, Korthikanti et al. 2022, flash attention: no s^2 term)
                       without:  L * 34 * t * H * b ;  t = tokens per micro-batch per rank
                       = ceil(minibatch / (W * grad_accum)) * (prompt + response tokens)
                       log-probs are fused with the lm_head: no [t, vocab] logits term

Per engine device (tensor parallel ``tp``): weights ``P * b / tp`` + KV cache ``rollouts * ceil(len / 128) * 128
* 2 * L * kv_heads * head_dim * b / tp`` (:func:`rlhf_fast.rollout.vllm_engine.kv_cache_bytes`).
Colocated, a device holds a learner rank and an engine share; the plan assumes the engine sleeps during the update
(vLLM sleep level 1: weights offloaded, KV cache freed; the driver does it in sync mode where vLLM can), so its peak
is ``max(learner, learner resident + engine)`` with the
resident part params + AdamW (+ ref, critic). :func:`check_fits` raises before any actor starts when the peak
exceeds the device memory.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import tempfile

import torch

from rlhf_fast.distributed.placement import LaunchError

GiB = 2**30
_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def _config(model_dir: str):
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(model_dir, trust_remote_code=False)


def _meta_model(config):
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=False)


@functools.lru_cache(maxsize=4)
def meta_model(model_dir: str):
    """``(config, model)`` of ``model_dir`` on the meta device; cached (a 70B config takes seconds to build)."""
    config = _config(model_dir)
    return config, _meta_model(config)


def param_count(model: torch.nn.Module) -> int:
    """Parameters of ``model``, shared (tied) tensors once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def shard_numel(model: torch.nn.Module, world: int) -> int:
    """Elements one FSDP2 rank holds of ``model``'s parameters (dim-0 shards, padded; shared tensors once)."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        rest = p[0].numel() if p.dim() > 1 else 1
        n += math.ceil(p.shape[0] / world) * rest if p.dim() else 1
    return n


@dataclasses.dataclass
class MemoryPlan:
    params: int              # total policy parameters
    learner: dict            # per learner rank: bytes by item
    engine: dict             # per engine device: bytes by item
    peak_device: int         # bytes on the fullest device
    colocate: bool

    def table(self) -> str:
        def rows(title, d):
            return [f"  {title}"] + [f"    {k:<34} {v / GiB:9.2f} GiB" for k, v in d.items()] + \
                [f"    {'total':<34} {sum(d.values()) / GiB:9.2f} GiB"]
        out = [f"policy parameters: {self.params / 1e9:.2f} B"]
        out += rows("per learner rank", self.learner) + rows("per engine device", self.engine)
        out.append(f"  peak per device ({'colocated' if self.colocate else 'disaggregated'}): "
                   f"{self.peak_device / GiB:.2f} GiB")
        return "\n".join(out)


def memory_plan(model_dir: str, *, learners: int, engines: int, colocate: bool, estimator: str, use_ref: bool,
                minibatch_size: int, grad_accum: int, rollouts: int, seq_len: int, param_dtype: str = "bfloat16",
                engine_tp: int = 1, activation_checkpointing: bool = True) -> MemoryPlan:
    """The per-rank plan of the module docstring for the model in ``model_dir`` (a config.json is enough)."""
    from rlhf_fast.rollout.vllm_engine import kv_cache_bytes
    if param_dtype not in _BYTES:
        raise ValueError(f"param_dtype must be one of {sorted(_BYTES)}, got {param_dtype!r}")
    b = _BYTES[param_dtype]
    config, model = meta_model(model_dir)
    P = param_count(model)
    Pr = shard_numel(model, learners)
    layers = model.model.layers if hasattr(model, "model") else []
    max_layer = max((sum(p.numel() for p in layer.parameters()) for layer in layers), default=0)
    H, L = config.hidden_size, config.num_hidden_layers
    t = math.ceil(minibatch_size / (learners * grad_accum)) * seq_len
    learner = {"policy params": Pr * b, "policy grads": Pr * b,
               "AdamW m, v (+ fp32 master)": Pr * (8 + (4 if b < 4 else 0))}
    if use_ref:
        learner["reference params"] = Pr * b
    if estimator == "gae":
        head = shard_numel(model.get_output_embeddings(), learners) if not config.tie_word_embeddings else 0
        crit = Pr - head + math.ceil((H + 1) / learners)
        learner["critic params + grads + AdamW"] = crit * (2 * b + 8 + (4 if b < 4 else 0))
    learner["gathered layers (current + prefetch)"] = 2 * max_layer * b
    act = (L * t * H * b + 34 * t * H * b) if activation_checkpointing else L * 34 * t * H * b
    learner["activations"] = act * (2 if estimator == "gae" else 1)
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        kv = kv_cache_bytes(tmp, param_dtype, max(1, math.ceil(rollouts / engines)), seq_len)
    engine = {"weights": P * b // engine_tp, "KV cache": kv // engine_tp}
    lsum, esum = sum(learner.values()), sum(engine.values())
    if colocate:
        resident = lsum - learner["policy grads"] - learner["activations"] - learner["gathered layers (current + prefetch)"]
        peak = max(lsum, resident + esum)
    else:
        peak = max(lsum, esum)
    return MemoryPlan(params=P, learner=learner, engine=engine, peak_device=peak, colocate=colocate)


def config_plan(cfg) -> MemoryPlan:
    """The plan of a :class:`~rlhf_fast.distributed.config.DistributedPPOConfig`: its placement and plan knobs."""
    return memory_plan(cfg.model, learners=cfg.learners, engines=cfg.engines, colocate=cfg.colocate,
                       estimator=cfg.estimator, use_ref=cfg.uses_ref,
                       minibatch_size=cfg.minibatch_size, grad_accum=cfg.grad_accum,
                       rollouts=cfg.batch_size * cfg.samples_per_prompt, seq_len=cfg.seq_len,
                       param_dtype=cfg.param_dtype, engine_tp=cfg.engine_tp,
                       activation_checkpointing=cfg.activation_checkpointing)


def device_memory_bytes() -> int:
    """Memory of one device: the GPU's, else the host's available RAM (``MemAvailable``: free pages plus the page
    cache the kernel can reclaim; ``MemFree`` alone refuses runs whenever files were read recently)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(model_dir: str, cfg, learners: int, engines: int, colocate: bool, budget_bytes: int | None = None,
               seq_len: int | None = None) -> MemoryPlan:
    """The plan for a run of ``cfg`` (PPOConfig); LaunchError when its device peak exceeds ``budget_bytes``
    (default: :func:`device_memory_bytes`; on CPU all roles share the host, so the sum over roles counts)."""
    on_gpu = torch.cuda.is_available()
    plan = memory_plan(model_dir, learners=learners, engines=engines, colocate=colocate, estimator=cfg.estimator,
                       use_ref=cfg.uses_ref, minibatch_size=cfg.minibatch_size,
                       grad_accum=cfg.grad_accum, rollouts=cfg.batch_size * cfg.samples_per_prompt,
                       seq_len=seq_len or _context(model_dir, cfg), param_dtype="bfloat16" if on_gpu else "float32",
                       activation_checkpointing=on_gpu)
    budget = budget_bytes if budget_bytes is not None else device_memory_bytes()
    need = plan.peak_device if on_gpu else learners * sum(plan.learner.values()) + engines * sum(plan.engine.values())
    if need > budget:
        raise LaunchError(f"the model in {model_dir} does not fit: the plan needs {need / GiB:.2f} GiB "
                          f"{'per device' if on_gpu else 'of host memory'}, {budget / GiB:.2f} GiB available\n"
                          f"{plan.table()}")
    return plan


def _context(model_dir: str, cfg) -> int:
    with open(os.path.join(model_dir, "config.json")) as f:
        limit = json.load(f).get("max_position_embeddings", 2048)
    return min(limit, 256 + cfg.max_new_tokens)
