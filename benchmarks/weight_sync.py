"""Weight sync learner -> running vLLM engine: bucketed (ours) against one reload call per tensor.

Case ``M100``: a 97.5M-parameter Llama (hidden 768, 12 layers, vocab 8192; 111 tensors, 390 MB in
fp32). ``rlhf_fast``: ``VLLMEngine.sync_weights`` (whole layers packed into 256 MB buckets: 2 calls).
``per-tensor``: one ``reload_weights`` call per tensor, the call pattern of per-parameter syncs
(OpenRLHF's per-parameter broadcast + load_weights). Timing only: on vLLM's CPU backend a layer whose
fused q/k/v or gate/up tensors arrive in separate reload calls is not rebuilt correctly, which is why
our buckets keep layers whole. ``bytes_moved`` = the model's bytes, read once and written once.
"""
from __future__ import annotations

from benchmarks._llama import llama, n_params
from benchmarks.harness import Case

SHAPE = dict(hidden=768, layers=12, vocab=8192, intermediate=2048)  # 97.5M parameters


def _inputs(device: str) -> dict:
    from rlhf_fast.rollout import VLLMEngine
    model = llama(**SHAPE).to(device)
    engine = VLLMEngine(model, max_model_len=128, pad_token_id=0, eos_token_id=2, gpu_memory_utilization=0.3,
                        sync_bucket_mb=256)
    return {"model": model, "engine": engine}


def _bucketed(inp) -> None:
    inp["engine"].sync_weights(inp["model"])


def _per_tensor(inp) -> None:
    from rlhf_fast.rollout.weight_sync import engine_weights
    engine = inp["engine"]
    for name, t in engine_weights(inp["model"], engine.dtype):
        engine.send_bucket([(name, t)])


def cases(quick: bool, device: str) -> list[Case]:
    model_bytes = 4 * n_params(**SHAPE)
    return [Case(
        name="M100", make_inputs=lambda: _inputs(device),
        impls={"rlhf_fast": _bucketed, "per-tensor": _per_tensor},
        bytes_moved=2 * model_bytes, min_reps=3, budget_s=2.0 if quick else 10.0, memory=False,
        size=model_bytes / 4, size_label="params",
    )]
