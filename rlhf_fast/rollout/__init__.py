"""Rollout engines (vLLM, HF generate), weight sync and the train/inference mismatch metric.

``VLLMEngine`` is imported lazily, so ``import rlhf_fast.rollout`` works without vllm installed.
"""
from rlhf_fast.rollout.base import RolloutEngine
from rlhf_fast.rollout.batch import RolloutBatch
from rlhf_fast.rollout.hf_engine import HFEngine
from rlhf_fast.rollout.mismatch import logprob_mismatch

__all__ = ["RolloutBatch", "RolloutEngine", "HFEngine", "VLLMEngine", "logprob_mismatch", "vllm_available"]


def vllm_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("vllm") is not None


def __getattr__(name):
    if name == "VLLMEngine":
        from rlhf_fast.rollout.vllm_engine import VLLMEngine
        return VLLMEngine
    raise AttributeError(f"module 'rlhf_fast.rollout' has no attribute {name!r}")
