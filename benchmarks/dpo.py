"""One DPO training step: our DPOTrainer vs TRL 1.16's DPOTrainer vs Liger's fused-linear DPO loss.

Case ``M50xP64xT256``: a Llama-architecture policy of ~52M parameters (hidden 512, 6 layers, MLP 1408,
head_dim 64) with a 32,000-row vocabulary (a word-level tokenizer with 32,000 entries), 64 preference pairs
whose sequences are 256 tokens each (64 prompt tokens incl. ``<bos>``, 192 completion tokens incl. ``<eos>``),
sigmoid loss, beta 0.1, one AdamW step on all 64 pairs, fp32, CPU.

- ``rlhf_fast``: ``DPOTrainer.train_step``: chosen and rejected in one forward per micro-batch (8 micro-batches
  of 8 pairs, gradients accumulated), log-probs through the fused lm_head path (no [tokens, 32000] logits),
  reference log-probs from the cache filled once per dataset pass (in the warm-up call; its time is the row's
  ``ref_cache_s``: one no-grad pass over the 64 pairs), no reference model in memory.
- ``trl``: ``DPOTrainer.train()`` for one step, TRL's defaults (its own reference copy of the model, the
  reference forward every step, its chunked fused lm_head), all 64 pairs in one micro-batch.
- ``trl-accum8``: the same with our micro-batching (``per_device_train_batch_size=8``,
  ``gradient_accumulation_steps=8``), so the memory comparison does not hinge on micro-batching alone.
- ``liger``: the HF backbone gives the policy's hidden states (and a reference copy's, no grad) for all 128
  sequences, ``LigerFusedLinearDPOLoss`` (chunked fused linear + DPO loss, ``compiled=False`` on CPU) on them,
  backward, AdamW step.
peak_mb is the whole process's peak resident memory during one step after a warm-up one
(``memory_scope="process"``: models, reference copies, optimizer state and activations all count), each impl
in a fresh process that builds only its own trainer. Even ``--quick`` runs several steps of a 50M model on
32,768 tokens per impl: tens of minutes on 2 CPU cores.
"""
from __future__ import annotations

import copy
import importlib.util
import random
import tempfile
import time

import torch

from benchmarks.harness import Case

PAIRS, PROMPT, COMPLETION, VOCAB, BETA = 64, 64, 192, 32_000, 0.1
MICRO = 8            # ours and trl-accum8: pairs per forward/backward


def _assets():
    from rlhf_fast.data import build_tokenizer
    from rlhf_fast.models import build_tiny_llama, tiny_llama_config
    words = [f"w{i}" for i in range(VOCAB)]
    tok = build_tokenizer([" ".join(words)], vocab_size=VOCAB)
    config = tiny_llama_config(VOCAB, hidden_size=512, num_layers=6, intermediate_size=1408,
                               max_position_embeddings=PROMPT + COMPLETION)
    model = build_tiny_llama(config, seed=0)
    rng = random.Random(0)
    text = lambda n: " ".join(rng.choice(words[4:]) for _ in range(n))   # noqa: E731
    # prompt: <bos> + 63 words; completions: 191 words + <eos>
    records = [{"prompt": text(PROMPT - 1), "chosen": text(COMPLETION - 1), "rejected": text(COMPLETION - 1)}
               for _ in range(PAIRS)]
    return tok, model, records


def _ours_inputs() -> dict:
    from rlhf_fast.trainer.dpo_config import DPOConfig
    from rlhf_fast.trainer.dpo import DPOTrainer
    tok, model, records = _assets()
    cfg = DPOConfig(out_dir=tempfile.mkdtemp(prefix="dpo_bench_"), batch_size=PAIRS, micro_batch_size=MICRO,
                    beta=BETA, lr=1e-6, max_steps=1000, progress=False)
    trainer = DPOTrainer(cfg, model, tok, records)
    t0 = time.perf_counter()
    trainer.ref_logps = trainer.compute_reference()
    return {"trainer": trainer, "step": 0, "ref_cache_s": time.perf_counter() - t0}


def _ours(state: dict) -> None:
    state["trainer"].train_step(state["step"])
    state["step"] += 1


def _trl_inputs(micro: int) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    tok, model, records = _assets()
    args = DPOConfig(output_dir=tempfile.mkdtemp(prefix="dpo_bench_trl_"), per_device_train_batch_size=micro,
                     gradient_accumulation_steps=PAIRS // micro, beta=BETA, max_length=None, max_steps=1,
                     learning_rate=1e-6, use_cpu=True, report_to="none", bf16=False, save_strategy="no",
                     logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0)
    data = [{"prompt": r["prompt"], "chosen": " " + r["chosen"], "rejected": " " + r["rejected"]} for r in records]
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(data), processing_class=tok)
    return {"trainer": trainer}


def _trl(state: dict) -> None:
    state["trainer"].train()


def _liger_inputs() -> dict:
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    from rlhf_fast.data.collators import collate_comparisons
    tok, model, records = _assets()
    batch = collate_comparisons(records, tok)                 # row 2i chosen, 2i+1 rejected
    order = torch.cat([torch.arange(0, 2 * PAIRS, 2), torch.arange(1, 2 * PAIRS, 2)])   # Liger: chosen first
    ids, attn, resp = (batch[k][order] for k in ("input_ids", "attention_mask", "response_mask"))
    target = ids[:, 1:].masked_fill(~resp[:, 1:], -100)
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    loss_fn = LigerFusedLinearDPOLoss(beta=BETA, compiled=False, use_ref_model=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
    return {"model": model, "ref": ref, "loss_fn": loss_fn, "opt": opt, "ids": ids, "attn": attn, "target": target}


def _liger(s: dict) -> None:
    model, ref = s["model"], s["ref"]
    with torch.no_grad():
        ref_h = ref.model(input_ids=s["ids"], attention_mask=s["attn"]).last_hidden_state[:, :-1]
    h = model.model(input_ids=s["ids"], attention_mask=s["attn"]).last_hidden_state[:, :-1]
    out = s["loss_fn"](model.lm_head.weight, h, s["target"], ref_input=ref_h, ref_weight=ref.lm_head.weight)
    loss = out[0] if isinstance(out, tuple) else out
    s["opt"].zero_grad(set_to_none=True)
    loss.backward()
    s["opt"].step()


def _lazy(impl: str, build, step):
    """Builds the impl's own trainer on its first (warm-up) call: a memory-probe process holds only its own."""
    def run(inputs: dict) -> None:
        if impl not in inputs:
            inputs[impl] = build()
        step(inputs[impl])
    return run


def _row_extra(impl: str, inputs: dict) -> dict:
    if impl == "rlhf_fast" and impl in inputs:
        return {"ref_cache_s": round(inputs[impl]["ref_cache_s"], 2), "micro_batch_pairs": MICRO}
    return {"micro_batch_pairs": MICRO if impl.endswith(f"accum{MICRO}") else PAIRS}


def _flops() -> float:
    """6 N per trained token (forward + backward) over the 2 x 64 sequences, N = parameters."""
    from rlhf_fast.models import tiny_llama_config
    from transformers import LlamaForCausalLM
    with torch.device("meta"):
        n = sum(p.numel() for p in LlamaForCausalLM(tiny_llama_config(VOCAB, 512, 6, 1408)).parameters())
    return 6 * n * 2 * PAIRS * (PROMPT + COMPLETION)


def cases(quick: bool, device: str) -> list[Case]:
    impls = {"rlhf_fast": _lazy("rlhf_fast", _ours_inputs, _ours)}
    if importlib.util.find_spec("trl") is not None:
        impls["trl"] = _lazy("trl", lambda: _trl_inputs(PAIRS), _trl)
        impls[f"trl-accum{MICRO}"] = _lazy(f"trl-accum{MICRO}", lambda: _trl_inputs(MICRO), _trl)
    if importlib.util.find_spec("liger_kernel") is not None:
        impls["liger"] = _lazy("liger", _liger_inputs, _liger)
    return [Case(name=f"M50xP{PAIRS}xT{PROMPT + COMPLETION}", make_inputs=dict, impls=impls,
                 tokens=2 * PAIRS * (PROMPT + COMPLETION), flops=_flops(), min_reps=1 if quick else 2, budget_s=0.0,
                 memory_scope="process", row_extra=_row_extra, size_label="pairs x tokens")]
