"""``DistributedPPOConfig``: PPOConfig plus the placement of a distributed run (and its memory plan's knobs)."""
from __future__ import annotations

import dataclasses

from rlhf_fast.trainer.config import ConfigError, PPOConfig, key


@dataclasses.dataclass
class DistributedPPOConfig(PPOConfig):
    """Distributed PPO: W FSDP2 learner ranks and E rollout engines placed by Ray."""
    learners: int = key(1, "learner ranks (one FSDP2 group)", ge=1)
    engines: int = key(1, "rollout engine actors (prompts split across them)", ge=1)
    colocate: bool = key(False, "learner i and engine i share a placement bundle (device); the engine sleeps "
                              "during the update where vLLM can (GPU; metric engine_slept)")
    async_mode: bool = key(False, "one-step off-policy: generate step k+1 while step k trains (TIS-corrected)")
    ray_address: str | None = key(None, "a running Ray cluster (host:port or auto); none: a local cluster")
    cpus_per_actor: float = key(1.0, "CPUs reserved per learner / engine actor (fractions pack roles)", gt=0)
    gpus_per_actor: float = key(0.0, "GPUs per learner / engine actor", ge=0)
    dry_run: bool = key(False, "print the per-rank memory plan (meta device) and exit; starts nothing")
    # the memory plan's knobs (the GPU launch: bf16 parameters, activation checkpointing)
    param_dtype: str = key("bfloat16", "plan: parameter dtype", choices=("bfloat16", "float16", "float32"))
    engine_tp: int = key(1, "tensor-parallel degree of each vLLM engine (its workers; disaggregated only)", ge=1)
    seq_len: int = key(2048, "plan: prompt + response tokens per rollout", ge=1)
    activation_checkpointing: bool = key(True, "plan: recompute each decoder layer in the backward")
    device_memory_gib: float | None = key(None, "plan: memory per device (GiB) the plan must fit in", gt=0)

    def check(self) -> None:
        super().check()
        if self.lora.rank:
            raise ConfigError("must be 0 for ppo-dist (its FSDP2 learners train full weights); LoRA runs on "
                              "rlhf-fast ppo", "lora.rank")
        if self.minibatch_size < self.learners * self.grad_accum:
            raise ConfigError(f"must be >= learners x grad_accum ({self.learners} x {self.grad_accum}): every "
                              f"rank needs a row per micro-batch, got {self.minibatch_size}", "minibatch_size")
