"""A step-time model of one distributed PPO iteration on a GPU cluster: generation, update and sync vs devices.

A model with named assumptions, not a measurement (nothing here has run on a GPU). Notation: ``P`` policy
parameters, ``Pc`` critic parameters (gae only: the policy minus an untied lm_head, plus a scalar head; else 0),
``b = 2`` bytes (bf16), ``R`` rollouts of ``p`` prompt + ``l`` response tokens, ``T = R (p + l)``, ``W`` learner
GPUs (one FSDP2 group), ``E`` engines of ``tp`` GPUs each, ``F = peak * mfu`` FLOP/s per GPU, every bandwidth
``B`` taken at ``bw_eff`` of its peak. Per iteration::

    generation  prefill  = 2 P p R / (E tp F)                                  (compute-bound)
                decode   = l * (max(bytes / B_hbm, 2 P n / (tp F)) + tp_comm)   n = ceil(R / E) rows per engine
                bytes    = (P b + n (p + l/2) kv) / tp     weight shard + the mean KV cache (kv bytes per token)
                tp_comm  = 2 L (latency + 2 (tp-1)/tp n H b / B_nvlink)         (tp > 1; two all-reduces a layer)
    update      compute  = (2 T (P [+ P ref] + Pc) + k T (P + Pc) epochs) / (W F)
                           forward-only old log-probs (+ ref log-probs) (+ critic values), then training:
                           k = 6 (forward + backward), 8 with activation checkpointing (the forward recomputed)
                comm     = (W-1)/W b / B_learn * (P [+ P ref] + Pc + 3 (P + Pc) m)      m = ceil(R / minibatch)
                           * grad_accum * epochs micro-batches; FSDP2 all-gathers each layer in the forward and
                           again in the backward and reduce-scatters its grads, per micro-batch
                update   = max(compute, comm)                       (FSDP2 prefetch overlaps the two)
    sync        gather = (W-1)/W P b / B_learn ; bcast = P b / B_bcast (disaggregated; colocated: CUDA IPC, 0);
                reload = P b / tp / B_hbm ; sync = max(gather, bcast, reload) + bucket / B_link (pipeline fill)
    sleep/wake  2 P b / tp / B_host      (colocated sync mode: vLLM sleep level 1 offloads the weights and back)
    step        sync mode: generation + update + sync (+ sleep/wake);  async (one-step off-policy):
                max(generation, update) + sync, disaggregated; colocated async shares the GPUs: no overlap
    tokens/s    R l / step     (response tokens, as in ``python -m benchmarks distributed``)

Links: ``B_learn`` is NVLink when the W learners fit in one node, else InfiniBand (the per-GPU NIC bounds a
ring); ``B_bcast`` is NVLink when learners and engines share one node, else InfiniBand. Not modelled: the reward
model's scoring, the AdamW step (memory-bound on a 1/W shard), attention FLOPs (~12 L H (p + l) per token),
responses that end before ``l`` tokens, KV caches that do not fit (see the memory plan), stragglers.
"""
from __future__ import annotations

import dataclasses
import math

MiB = 2**20


@dataclasses.dataclass(frozen=True)
class Hardware:
    """Peak rates of one GPU and its links; ``mfu`` and ``bw_eff`` are the assumed achieved fractions."""
    name: str
    memory_gib: float
    hbm_TBps: float
    bf16_TFLOPs: float = 989.0       # dense bf16 matmul peak (H100 / H200 SXM)
    mfu: float = 0.4
    bw_eff: float = 0.8
    nvlink_GBps: float = 450.0       # per direction, per GPU
    ib_GBps: float = 50.0            # per GPU: one 400 Gb/s NIC per GPU, 8 per node
    host_GBps: float = 50.0          # PCIe gen5 x16, pinned host memory
    latency_us: float = 10.0         # one small all-reduce
    gpus_per_node: int = 8
    bucket_MiB: float = 64.0         # weight-sync bucket (rlhf_fast.distributed.channel)

    @property
    def flops(self) -> float:
        return self.bf16_TFLOPs * 1e12 * self.mfu

    @property
    def hbm(self) -> float:
        return self.bw(self.hbm_TBps * 1e3)

    def bw(self, GBps: float) -> float:
        return GBps * 1e9 * self.bw_eff

    def describe(self) -> str:
        return (f"{self.name}: bf16 {self.bf16_TFLOPs:g} TFLOP/s at MFU {self.mfu:g}, HBM {self.hbm_TBps:g} TB/s, "
                f"NVLink {self.nvlink_GBps:g} GB/s, IB {self.ib_GBps:g} GB/s per GPU, host {self.host_GBps:g} "
                f"GB/s, bandwidths at {self.bw_eff:g} of peak, {self.latency_us:g} µs per small all-reduce, "
                f"{self.gpus_per_node} GPUs per node, {self.memory_gib:g} GiB")


H100 = Hardware("H100 SXM", memory_gib=80, hbm_TBps=3.35)
H200 = Hardware("H200 SXM", memory_gib=139, hbm_TBps=4.8)   # 141 GB, ~139 GiB usable


@dataclasses.dataclass(frozen=True)
class Workload:
    """One iteration's sizes and its placement (the symbols of the module docstring)."""
    params: int                  # P
    critic_params: int           # Pc (0: no critic)
    ref: bool                    # a reference model's forward (KL term)
    layers: int                  # L
    hidden: int                  # H
    kv_bytes_per_token: int      # kv: K and V of one token, all layers
    rollouts: int                # R
    prompt: int                  # p
    response: int                # l
    ppo_epochs: int
    minibatch: int
    grad_accum: int
    checkpointing: bool
    learners: int                # W
    engines: int                 # E
    tp: int
    colocate: bool
    async_mode: bool
    bytes_per_param: int = 2

    def __post_init__(self):
        if self.colocate and self.engines * self.tp != self.learners:
            raise ValueError(f"engines x tp must equal learners when colocated (one engine share per learner GPU), "
                             f"got {self.engines} x {self.tp} and {self.learners}")

    @property
    def gpus(self) -> int:
        return self.learners if self.colocate else self.learners + self.engines * self.tp


@dataclasses.dataclass(frozen=True)
class StepTime:
    """Seconds per iteration by phase (see the module docstring) and response tokens per second."""
    prefill: float
    decode: float
    update_compute: float
    update_comm: float
    sync: float
    sleep_wake: float
    step: float
    tokens_per_s: float

    @property
    def generation(self) -> float:
        return self.prefill + self.decode

    @property
    def update(self) -> float:
        return max(self.update_compute, self.update_comm)


def workload(cfg) -> Workload:
    """The :class:`Workload` of a DistributedPPOConfig; parameters counted on the meta device by the memory plan."""
    from rlhf_fast.distributed.plan import _BYTES, meta_model, param_count
    from rlhf_fast.models.geometry import model_geometry
    if cfg.seq_len <= cfg.max_new_tokens:
        raise ValueError(f"seq_len ({cfg.seq_len}) must exceed max_new_tokens ({cfg.max_new_tokens}): "
                         "the prompt is seq_len - max_new_tokens tokens")
    geo = model_geometry(cfg.model)
    P = param_count(meta_model(cfg.model)[1])
    head = 0 if geo.tied else geo.vocab * geo.hidden
    b = _BYTES[cfg.param_dtype]
    return Workload(params=P, critic_params=P - head + geo.hidden + 1 if cfg.estimator == "gae" else 0,
                    ref=cfg.uses_ref, layers=geo.layers, hidden=geo.hidden,
                    kv_bytes_per_token=geo.kv_bytes_per_token(b), rollouts=cfg.batch_size * cfg.samples_per_prompt,
                    prompt=cfg.seq_len - cfg.max_new_tokens, response=cfg.max_new_tokens, ppo_epochs=cfg.ppo_epochs,
                    minibatch=cfg.minibatch_size, grad_accum=cfg.grad_accum,
                    checkpointing=cfg.activation_checkpointing, learners=cfg.learners, engines=cfg.engines,
                    tp=cfg.engine_tp, colocate=cfg.colocate, async_mode=cfg.async_mode, bytes_per_param=b)


def _links(w: Workload, hw: Hardware) -> tuple[float, float]:
    """(B_learn, B_bcast) in bytes/s."""
    nvlink, ib = hw.bw(hw.nvlink_GBps), hw.bw(hw.ib_GBps)
    return (nvlink if w.learners <= hw.gpus_per_node else ib), (nvlink if w.gpus <= hw.gpus_per_node else ib)


def generation(w: Workload, hw: Hardware) -> tuple[float, float]:
    """(prefill, decode) seconds."""
    P, b = w.params, w.bytes_per_param
    n = math.ceil(w.rollouts / w.engines)
    prefill = 2 * P * w.prompt * w.rollouts / (w.engines * w.tp * hw.flops)
    read = (P * b + n * (w.prompt + w.response / 2) * w.kv_bytes_per_token) / w.tp
    tp_comm = 0.0
    if w.tp > 1:
        tp_comm = 2 * w.layers * (hw.latency_us * 1e-6
                                  + 2 * (w.tp - 1) / w.tp * n * w.hidden * b / hw.bw(hw.nvlink_GBps))
    per_step = max(read / hw.hbm, 2 * P * n / (w.tp * hw.flops)) + tp_comm
    return prefill, w.response * per_step


def update(w: Workload, hw: Hardware) -> tuple[float, float]:
    """(compute, comm) seconds of make_experience's forward passes plus the PPO epochs."""
    T = w.rollouts * (w.prompt + w.response)
    trained = w.params + w.critic_params
    forward_only = trained + (w.params if w.ref else 0)
    k = 8 if w.checkpointing else 6
    compute = (2 * T * forward_only + k * T * trained * w.ppo_epochs) / (w.learners * hw.flops)
    micro = math.ceil(w.rollouts / w.minibatch) * w.grad_accum * w.ppo_epochs
    ring = (w.learners - 1) / w.learners * w.bytes_per_param / _links(w, hw)[0]
    return compute, ring * (forward_only + 3 * trained * micro)


def sync(w: Workload, hw: Hardware) -> float:
    """Seconds to gather the full weights from the FSDP2 shards and land them in every engine."""
    size, (learn, bcast) = w.params * w.bytes_per_param, _links(w, hw)
    gather = (w.learners - 1) / w.learners * size / learn
    send = 0.0 if w.colocate else size / bcast
    reload = size / w.tp / hw.hbm
    return max(gather, send, reload) + hw.bucket_MiB * MiB / (learn if w.colocate else bcast)


def step_time(w: Workload, hw: Hardware) -> StepTime:
    """The iteration of ``w`` on ``hw`` by phase (module docstring)."""
    prefill, decode = generation(w, hw)
    compute, comm = update(w, hw)
    s = sync(w, hw)
    sleep_wake = 2 * w.params * w.bytes_per_param / w.tp / hw.bw(hw.host_GBps) if w.colocate and not w.async_mode \
        else 0.0
    gen, upd = prefill + decode, max(compute, comm)
    overlap = w.async_mode and not w.colocate
    step = (max(gen, upd) if overlap else gen + upd) + s + sleep_wake
    return StepTime(prefill, decode, compute, comm, s, sleep_wake, step, w.rollouts * w.response / step)
