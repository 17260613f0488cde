"""GPU weight sync through vLLM's native weight-transfer engines (CUDA IPC or NCCL), trainer side.

The engine's workers are driven through ``collective_rpc`` (one call per phase: init, start, update, finish);
the vLLM classes come from ``vllm_compat``.
"""
from __future__ import annotations

import torch

from rlhf_fast.rollout import vllm_compat as compat


class LLMWeightSyncClient:
    """``VLLMWeightSyncClient`` over an in-process ``vllm.LLM``: each call is one ``collective_rpc``."""

    def __init__(self, llm, timeout: float | None):
        self.llm, self.timeout = llm, timeout

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        compat.collective_rpc(self.llm, "init_weight_transfer_engine", kwargs={"init_info": init_info},
                              timeout=self.timeout)

    def start_weight_update(self) -> None:
        compat.collective_rpc(self.llm, "start_weight_update", timeout=self.timeout)

    def update_weights(self, update_info) -> None:
        compat.collective_rpc(self.llm, "update_weights", kwargs={"update_info": update_info}, timeout=self.timeout)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        compat.collective_rpc(self.llm, "finish_weight_update", timeout=self.timeout)


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
    engine_cls, info = compat.trainer_transfer(kind, bucket_bytes=bucket_bytes, master_address=master_address,
                                               master_port=master_port, world_size=world_size)
    return engine_cls.trainer_init(info, client=LLMWeightSyncClient(llm, timeout), source=compat.named_source(named))
