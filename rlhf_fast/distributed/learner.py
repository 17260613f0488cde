"""One learner rank: FSDP2-sharded policy (+ frozen reference, + critic), data-parallel scoring and update.

Sharding (each model): ``fully_shard`` on every decoder layer, then on the root. The policy's root is a thin
wrapper whose ``forward`` is :func:`rlhf_fast.models.policy_logprobs.policy_logprobs`, so the root's hooks unshard
the embedding, final norm and lm_head that the fused log-prob op reads directly (tied embeddings stay tied).

Per iteration, on every rank (the driver calls all ranks at once; all run the same collectives)::

    make_experience   rows r of the batch -> old_logp, ref_logp, V on r -> all-gather -> algos.make_experience
                      on the whole batch (identical on every rank; rlhf_fast.distributed.dp)
    update            epochs x minibatches (same permutation on every rank); minibatch M -> global totals ->
                      this rank's rows M_r (x grad_accum micro-batches) -> backward of W * algos.ppo_objective
                      -> FSDP2 reduce-scatter (mean) -> clip_grad_norm_ -> AdamW
    sync_weights(v)   per bucket of whole layers: each tensor all-gathered from its shards straight into the
                      bucket's flat buffer (a collective over learners); each sender rank (one per weight
                      channel, placement.weight_routes) sends the buffer to its engines
                      (rlhf_fast.distributed.channel) while the next bucket is gathered

Devices: an NCCL learner group (GPU actors) keeps the models, the batch and the experience on the rank's GPU;
a gloo group keeps everything on the host.
"""
from __future__ import annotations

import copy
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from rlhf_fast.algos import AdvantageParams, Outputs, make_experience, ppo_objective
from rlhf_fast.distributed.channel import WeightChannel, buffer_device, pack
from rlhf_fast.distributed.dp import all_gather_rows, global_totals, shard_rows
from rlhf_fast.models.packing import resolve_packing
from rlhf_fast.models.policy_logprobs import policy_logprobs
from rlhf_fast.models.value_model import ValueModel, base_model
from rlhf_fast.rollout import RolloutBatch, logprob_mismatch
from rlhf_fast.rollout.weight_sync import engine_weights, plan_buckets
from rlhf_fast.trainer.base import make_optimizer, step_seed

SHARE_KEYS = ("policy_loss", "value_loss", "entropy")   # rank shares of a minibatch total: summed over ranks


class ScoredLM(nn.Module):
    """FSDP2 root around a causal LM: ``forward(ids, attn, response_mask_full) -> logp [, entropy]`` ``[B, L]``;
    ``pack``: its decoder runs padding-free (rlhf_fast.models.packing), as the single-process trainer's does."""

    def __init__(self, module: nn.Module, temperature: float, pack: bool = False):
        super().__init__()
        self.module, self.temperature, self.pack = module, temperature, pack

    def forward(self, input_ids, attention_mask, response_mask, entropy: bool = False):
        return policy_logprobs(self.module, input_ids, attention_mask, response_mask, temperature=self.temperature,
                               return_entropy=entropy, pack=self.pack)


def shard_model(root: nn.Module, layers) -> nn.Module:
    """``fully_shard`` each decoder layer, then ``root`` (which then owns embeddings, norm, head)."""
    for layer in layers:
        fully_shard(layer)
    fully_shard(root)
    return root


def _item(t) -> float:
    """A 0-dim tensor or DTensor (clip_grad_norm_ of FSDP2 parameters) as a float."""
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)


def gather_into(t: torch.Tensor, out: torch.Tensor) -> None:
    """The full value of ``t`` (an FSDP2 DTensor sharded on dim 0, or a plain tensor) written into ``out``.

    One rank: its shard is the whole tensor (one copy). Even shards: ``all_gather_into_tensor`` writes the W
    shards straight into ``out`` (dim-0 concatenation = the Shard(0) layout). Uneven (padded) shards:
    ``full_tensor()`` then a copy. ``out`` is on the shards' device (every rank takes the same branch)."""
    if not hasattr(t, "to_local"):
        out.copy_(t)
        return
    local, world = t.to_local(), t.device_mesh.size()
    if world == 1:
        out.copy_(local)
    elif local.shape[0] * world == t.shape[0]:
        dist.all_gather_into_tensor(out, local.contiguous(), group=t.device_mesh.get_group())
    else:
        out.copy_(t.full_tensor())


def init_learner_group(rank: int, world: int, port: int, host: str = "127.0.0.1", backend: str = "gloo") -> None:
    """The learners' default process group (FSDP2's), rendezvous over TCP at ``host:port``; ``"nccl"``: on this
    process's first visible GPU (a Ray actor sees the GPUs it was given)."""
    if host in ("127.0.0.1", "localhost"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if backend == "nccl":
        torch.cuda.set_device(0)
    dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))


class Learner:
    """``Learner(model_dir, cfg, critic_state=None)``: this process's rank of the learner group
    (:func:`init_learner_group` first).

    ``cfg`` a :class:`rlhf_fast.trainer.config.PPOConfig` (critic="separate" only); ``critic_state`` an initial
    critic state dict (e.g. from a reward model; default: a copy of the policy backbone with a fresh head).
    """

    def __init__(self, model_dir: str, cfg, critic_state: dict | None = None):
        from transformers import AutoModelForCausalLM
        rank, world = dist.get_rank(), dist.get_world_size()
        if cfg.critic != "separate" and cfg.estimator == "gae":
            raise ValueError("distributed PPO supports critic='separate' only")
        if cfg.ptx_coef > 0 or cfg.online_rm_every:
            raise ValueError("distributed PPO supports neither ptx_coef > 0 nor online_rm_every yet")
        if cfg.minibatch_size < world * cfg.grad_accum:
            raise ValueError(f"minibatch_size ({cfg.minibatch_size}) must be >= learners x grad_accum "
                             f"({world} x {cfg.grad_accum}): every rank needs a row per micro-batch")
        self.rank, self.world, self.cfg = rank, world, cfg
        self.device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else \
            torch.device("cpu")
        self.version = 0
        self.channel: WeightChannel | None = None
        self._gather_buf: torch.Tensor | None = None   # a non-sender's output of the sync's all-gathers
        self.exp: dict | None = None
        torch.manual_seed(cfg.seed)

        def load():
            return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(self.device)
        hf = load()
        self.use_ref = cfg.uses_ref
        self.critic = None
        if cfg.estimator == "gae":
            self.critic = ValueModel(copy.deepcopy(base_model(hf))).to(self.device)
            if critic_state is not None:
                self.critic.load_state_dict(critic_state)
            shard_model(self.critic, self.critic.backbone.layers)
        pack = resolve_packing(cfg.pack_sequences, hf)
        self.policy = shard_model(ScoredLM(hf, cfg.temperature, pack), base_model(hf).layers)
        self.ref = None
        if self.use_ref:
            ref = load().requires_grad_(False).eval()
            self.ref = shard_model(ScoredLM(ref, cfg.temperature, pack), base_model(ref).layers)
        self.optimizer, self.scheduler = make_optimizer(self.policy.parameters(), cfg.lr, cfg.warmup_steps)
        self.critic_optimizer = make_optimizer(self.critic.parameters(), cfg.critic_lr)[0] if self.critic else None

    # -- weight channel -----------------------------------------------------------------------------
    def join_channel(self, host: str, port: int, world: int, backend: str = "gloo",
                     transport: str = "broadcast") -> None:
        """This rank becomes the sender (rank 0) of a new weight channel to ``world - 1`` engines (its last one
        closed). The channel's buffers live where the shards do (the all-gathers write into them): gloo
        broadcast / shm for CPU learners, nccl / cuda_ipc for GPU learners."""
        if buffer_device(backend, transport) != self.device.type:
            raise ValueError(f"a weight channel ({backend}, {transport}) cannot take the all-gathers of learners "
                             f"on {self.device.type}: CPU learners use gloo broadcast or shm, GPU learners nccl "
                             f"broadcast or cuda_ipc")
        if self.channel is not None:
            self.channel.close()
        self.channel = WeightChannel(host, port, 0, world, backend=backend, transport=transport)

    def sync_weights(self, dtype: torch.dtype = torch.float32, bucket_bytes: int = 64 * 2**20) -> int:
        """Gather the full policy bucket by bucket straight into the channel's buffer and broadcast it to the
        engines (bucket i on the wire while bucket i + 1 is gathered); returns the version sent.

        64 MB buckets: enough of them (M100: 7) for transfer and the engines' reload to overlap, few enough
        that the per-call cost of ``reload_weights`` (~5 ms) stays small."""
        buckets = plan_buckets(engine_weights(self.policy.module, dtype), bucket_bytes)   # DTensors, global shapes
        sender = self.channel is not None       # ranks without engines of their own only take part in the gathers
        if sender:
            self.channel.send_plan(self.version, [[(n, list(t.shape)) for n, t in b] for b in buckets], dtype)
        for bucket in buckets:
            numel = sum(t.numel() for _, t in bucket)
            flat = self.channel.bucket_buffer(numel) if sender else self._scratch(numel, dtype)
            pack(bucket, flat, gather_into)
            if sender:
                self.channel.send_buffer(flat)
        if sender:
            self.channel.flush()
        return self.version

    def _scratch(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A non-sender's output of the all-gathers (a sender gathers into its channel's buffer)."""
        if self._gather_buf is None or self._gather_buf.numel() < numel or self._gather_buf.dtype != dtype:
            self._gather_buf = torch.empty(numel, dtype=dtype, device=self.device)
        return self._gather_buf[:numel]

    def full_state_dict(self) -> dict:
        """The policy's full HF state dict (rank 0; empty elsewhere), gathered to CPU."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(self.policy.module,
                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if self.rank == 0 else {}

    # -- sharded checkpoints (torch.distributed.checkpoint: any learner count can load them) ------------
    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model, optim = get_state_dict(self.policy, self.optimizer)
        state = {"policy": model, "optimizer": optim, "scheduler": self.scheduler.state_dict()}
        if self.critic is not None:
            state["critic"], state["critic_optimizer"] = get_state_dict(self.critic, self.critic_optimizer)
        return state

    def save(self, path: str) -> None:
        import torch.distributed.checkpoint as dcp
        dcp.save(self._state(), checkpoint_id=path)

    def load(self, path: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict
        state = self._state()
        dcp.load(state, checkpoint_id=path)
        set_state_dict(self.policy, self.optimizer, model_state_dict=state["policy"],
                       optim_state_dict=state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.critic is not None:
            set_state_dict(self.critic, self.critic_optimizer, model_state_dict=state["critic"],
                           optim_state_dict=state["critic_optimizer"])

    def set_version(self, version: int) -> None:
        self.version = version

    # -- experience -----------------------------------------------------------------------------------
    @torch.no_grad()
    def make_experience(self, batch: RolloutBatch, scores: torch.Tensor, kl_coef: float) -> dict:
        """Score this rank's rows, gather, build the whole-batch experience; returns the trainer's stats."""
        cfg, B = self.cfg, len(batch)
        batch, scores = batch.to(self.device), scores.to(self.device)
        P = batch.prompt_length
        seq = (batch.input_ids, batch.attention_mask, batch.response_mask_full)
        rows = shard_rows(B, self.world, self.rank)

        def gather(model, fn):
            model.eval()
            return all_gather_rows(fn(model, *(t[rows] for t in seq)), B)
        old_logp = gather(self.policy, lambda m, i, a, f: m(i, a, f)[:, P:])
        ref_logp = gather(self.ref, lambda m, i, a, f: m(i, a, f)[:, P:]) if self.ref is not None else None
        values = gather(self.critic, lambda m, i, a, f: m(i, a)[:, P - 1:-1]) if self.critic is not None else None
        params = AdvantageParams(cfg.gamma, cfg.lam, cfg.samples_per_prompt, cfg.whiten_advantages)
        self.exp, stats = make_experience(batch, scores, old_logp, ref_logp, values, estimator=cfg.estimator,
                                          params=params, kl_coef=kl_coef, kl_estimator=cfg.kl_estimator,
                                          reward_clip=cfg.reward_clip)
        cap = cfg.tis_cap if cfg.tis_cap is not None else 2.0
        stats.update({f"mismatch_{k}": float(v) for k, v in
                      logprob_mismatch(batch.rollout_logprobs, old_logp, batch.response_mask, cap).items()})
        return stats

    # -- update ---------------------------------------------------------------------------------------
    def _micro_loss(self, rows: torch.Tensor, totals: tuple[int, int]) -> tuple[torch.Tensor, dict]:
        cfg, piece = self.cfg, self.exp.rows(rows)
        P = piece.prompt_len
        want_entropy = cfg.entropy_coef > 0 or cfg.log_entropy
        out = self.policy(piece.input_ids, piece.attention_mask, piece.response_mask_full, entropy=want_entropy)
        logp, entropy = (out[0][:, P:], out[1][:, P:]) if want_entropy else (out[:, P:], None)
        values = self.critic(piece.input_ids, piece.attention_mask)[:, P - 1:-1] if self.critic is not None else None
        return ppo_objective(cfg, piece, Outputs(logp, entropy, values), totals)

    def update(self, step: int) -> dict:
        """PPO epochs x minibatches over the stored experience; all ranks step identically. Returns mean stats."""
        if self.exp is None:
            raise RuntimeError("make_experience before update")
        cfg = self.cfg
        B = len(self.exp)
        self.policy.train()
        per_minibatch = []
        for epoch in range(cfg.ppo_epochs):
            g = torch.Generator().manual_seed(step_seed(cfg.seed, step, salt=epoch + 1))
            for mb in torch.randperm(B, generator=g).split(cfg.minibatch_size):
                if len(mb) < self.world * cfg.grad_accum:
                    raise ValueError(f"a minibatch of {len(mb)} rows cannot feed {self.world} ranks x "
                                     f"{cfg.grad_accum} micro-batches (batch rows {B}, minibatch_size "
                                     f"{cfg.minibatch_size})")
                self.optimizer.zero_grad(set_to_none=True)
                if self.critic_optimizer is not None:
                    self.critic_optimizer.zero_grad(set_to_none=True)
                sums: dict[str, float] = {}
                mine = mb.tensor_split(self.world)[self.rank]
                totals = global_totals(self.exp.mask[mine])
                for micro in mine.tensor_split(cfg.grad_accum):
                    loss, stats = self._micro_loss(micro, totals)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"non-finite loss at step {step} on learner rank {self.rank}")
                    (loss * self.world).backward()
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + float(v) / (1 if k in SHARE_KEYS else cfg.grad_accum)
                stats = self._reduce_stats(sums)
                stats["grad_norm"] = _item(torch.nn.utils.clip_grad_norm_(self.policy.parameters(),
                                                                          cfg.max_grad_norm))
                self.optimizer.step()
                if self.critic_optimizer is not None:
                    torch.nn.utils.clip_grad_norm_(self.critic.parameters(), cfg.max_grad_norm)
                    self.critic_optimizer.step()
                per_minibatch.append(stats)
        self.scheduler.step()
        self.version += 1
        return {k: sum(s[k] for s in per_minibatch) / len(per_minibatch) for k in per_minibatch[0]}

    def _reduce_stats(self, local: dict[str, float]) -> dict[str, float]:
        """Shares summed over ranks, means averaged over ranks."""
        keys = sorted(local)
        t = torch.tensor([local[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: float(v) / (1 if k in SHARE_KEYS else self.world) for k, v in zip(keys, t)}

