"""Beyond one process: FSDP2 learner ranks, rollout engines in Ray actors, broadcast weight sync.

    channel     WeightChannel: a sender learner rank -> its engines over a group of their own (gloo or NCCL
                broadcast, shm, cuda_ipc), versioned
    dp          row shards, all-gathers and the all-reduced minibatch totals of data parallelism
    learner     one FSDP2 rank: score, update (algos.ppo_objective), gather + broadcast, DCP checkpoints
    engine      one rollout engine (vLLM / HF) that receives the broadcast
    placement   Ray: connect, resource checks, learner / engine actors (colocated or not), weight routes
    driver      DistributedPPO: the iteration loop, async mode, engine replacement, checkpoints
    plan        the per-rank memory plan on the meta device (--dry-run, and the pre-start fit check)
    config, cli DistributedPPOConfig and ``rlhf-fast ppo-dist``

``ray`` is imported only by placement and driver, so the torch.distributed parts work without it.
"""
