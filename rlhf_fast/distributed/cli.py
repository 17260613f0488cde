"""``rlhf-fast ppo --learners W --engines E`` (alias ``ppo-dist``): distributed PPO (``[--colocate] [--async]
[--ray-address ADDR] [--dry-run]``), a :class:`DistributedPPOConfig` from ``--config`` YAML and ``--key value``."""
from __future__ import annotations

import os

from rlhf_fast.distributed.config import DistributedPPOConfig
from rlhf_fast.trainer.config import ConfigError

GiB = 2**30


def check_placement(cfg: DistributedPPOConfig) -> None:
    """:func:`placement.check_placement` of ``cfg``'s roles (LaunchError; no Ray, no model)."""
    from rlhf_fast.distributed import placement
    placement.check_placement(cfg.learners, cfg.engines, cfg.colocate, cfg.gpus_per_actor, cfg.engine_tp,
                              cfg.engine)


def dry_run(cfg: DistributedPPOConfig) -> str:
    """The memory plan of ``cfg``, built on the meta device; ConfigError when it exceeds ``device_memory_gib``."""
    from rlhf_fast.distributed.placement import LaunchError, local_cluster, weight_routes
    from rlhf_fast.distributed.plan import config_plan
    plan = config_plan(cfg)
    head = (f"plan: {cfg.learners} learner ranks (FSDP2), {cfg.engines} engines (tp {cfg.engine_tp}), "
            f"{'colocated' if cfg.colocate else 'disaggregated'}, {cfg.param_dtype}, estimator {cfg.estimator}")
    try:
        check_placement(cfg)
    except LaunchError as e:
        sync = f"not launchable yet: {e}"
    else:
        backend, transport, routes = weight_routes(cfg.learners, cfg.engines, cfg.colocate, cfg.gpus_per_actor,
                                                   loopback=local_cluster(cfg.ray_address))
        sync = f"{backend} {transport}, " + ("rank 0 -> every engine" if len(routes) == 1 else
                                             f"{len(routes)} sender ranks, each -> the engine(s) of its bundle")
    text = f"{head}\nweight sync: {sync}\n{plan.table()}"
    if cfg.device_memory_gib is not None and plan.peak_device > cfg.device_memory_gib * GiB:
        raise ConfigError(f"= {cfg.device_memory_gib:g} GiB is less than the plan's {plan.peak_device / GiB:.2f} "
                          f"GiB per device:\n{text}", "device_memory_gib")
    return text


def cmd_ppo_dist(cfg: DistributedPPOConfig, resume: bool) -> None:
    if cfg.dry_run:
        print(dry_run(cfg))
        return
    from transformers import AutoTokenizer
    from rlhf_fast.distributed.driver import DistributedPPO, LearnerDiedError
    from rlhf_fast.preflight import read_data
    check_placement(cfg)     # before anything is read; the cluster's checks run in DistributedPPO
    if not cfg.reward_model:
        raise SystemExit("error: --reward-model PATH is required")
    tok = AutoTokenizer.from_pretrained(cfg.model)
    prompts = [r["prompt"] for _, r in read_data(cfg, "prompts", "prompts", tok)]
    # DistributedPPO loads the reward model after its pre-start checks (LaunchError: one line)
    run = DistributedPPO(cfg, cfg.model, prompts, reward_model=cfg.reward_model, learners=cfg.learners,
                         engines=cfg.engines, colocate=cfg.colocate, async_mode=cfg.async_mode,
                         ray_address=cfg.ray_address, engine=cfg.engine, cpus=cfg.cpus_per_actor,
                         gpus=cfg.gpus_per_actor, engine_tp=cfg.engine_tp)
    try:
        run.train(resume=resume)
        run.save_policy(os.path.join(cfg.out_dir, "policy"), tok)
    except LearnerDiedError as e:     # one line: which rank, which step, the checkpoint --resume continues from
        raise SystemExit(f"error: {e}") from None
    finally:
        run.close()
    print(f"policy saved to {os.path.join(cfg.out_dir, 'policy')}")
