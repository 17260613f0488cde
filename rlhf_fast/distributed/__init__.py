"""Beyond one process: FSDP2 learner ranks, rollout engines in Ray actors, broadcast weight sync.

    channel     WeightChannel: learner rank 0 -> engines over a dedicated gloo/NCCL group, versioned
    objective   the PPO minibatch loss split over data-parallel ranks, normalised by global totals
    experience  data-parallel scoring, all-gathered, advantages on the whole batch
    learner     one FSDP2 rank: score, update, gather + broadcast the weights
    engine      one rollout engine (vLLM / HF) that receives the broadcast

Ray-specific pieces (placement, driver) import ``ray`` lazily, so the torch.distributed parts work without it.
"""
