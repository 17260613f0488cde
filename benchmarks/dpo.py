"""One DPO training step: our DPOTrainer vs TRL 1.16's DPOTrainer vs Liger's fused-linear DPO loss.

Case ``M50xP64xT256``: a Llama-architecture policy of ~52M parameters (hidden 512, 6 layers, MLP 1408,
head_dim 64) with a 32,000-row vocabulary (a word-level tokenizer with 32,000 entries), 64 preference pairs
whose sequences are 256 tokens each (64 prompt tokens incl. ``<bos>``, 192 completion tokens incl. ``<eos>``),
sigmoid loss, beta 0.1, one AdamW step on all 64 pairs, fp32, CPU. ``--quick``: the same model on
``M50xP16xT128`` (16 pairs of 32 + 96 tokens), for a shared machine where a 32,768-token step of a 50M model
takes minutes.

- ``rlhf_fast``: ``DPOTrainer.train_step``: chosen and rejected in one forward per micro-batch (8 micro-batches
  of pairs / 8 pairs each, gradients accumulated), log-probs through the fused lm_head path (no [tokens, 32000] logits),
  reference log-probs from the cache filled once per dataset pass (in the warm-up call; its time is the row's
  ``ref_cache_s``: one no-grad pass over the pairs), no reference model in memory.
- ``trl``: ``DPOTrainer.train()`` for one step, TRL's defaults (a reference copy of the model, the
  reference forward every step, its tiled fused lm_head), all pairs in one micro-batch.
- ``trl-accum8``: the same with our micro-batching (``gradient_accumulation_steps=8`` micro-batches), so the
  memory comparison does not hinge on micro-batching alone.
  At the full size ``trl`` (one micro-batch) is left out: it materialises the [32768, 32000] fp32 logits of all
  128 sequences (4.2 GB each) several times over (its ``--quick`` peak, 5.6 GB at 4,096 tokens, scales to an estimated ~35 GB
  at 32,768), beyond this 24 GiB machine; ``trl-accum8`` is TRL's DPOTrainer at that size.
- ``liger``: the HF backbone gives the policy's hidden states (and a reference copy's, no grad) for all 128
  sequences, ``LigerFusedLinearDPOLoss`` (chunked fused linear + DPO loss, ``compiled=False`` on CPU) on them,
  backward, AdamW step.
peak_mb is the whole process's peak resident memory during one step after a warm-up one
(``memory_scope="process"``: models, reference copies, optimizer state and activations all count), each impl
in a fresh process that builds only its own trainer. Both sizes time one step after a warm-up one (a full-size
step of a 50M model on 32,768 tokens takes minutes on 2 CPU cores; the memory probe runs two more).
"""
from __future__ import annotations

import copy
import importlib.util
import random
import tempfile
import time

import torch

from benchmarks.harness import Case, lazy_impl

VOCAB, BETA = 32_000, 0.1
ACCUM = 8            # ours and trl-accum8: micro-batches per step
SIZES = {False: (64, 64, 192), True: (16, 32, 96)}      # quick -> (pairs, prompt tokens, completion tokens)


def _assets(pairs: int, prompt: int, completion: int):
    from rlhf_fast.data import build_tokenizer
    from rlhf_fast.models import build_tiny_llama, tiny_llama_config
    words = [f"w{i}" for i in range(VOCAB)]
    tok = build_tokenizer([" ".join(words)], vocab_size=VOCAB)
    config = tiny_llama_config(VOCAB, hidden_size=512, num_layers=6, intermediate_size=1408,
                               max_position_embeddings=prompt + completion)
    model = build_tiny_llama(config, seed=0)
    rng = random.Random(0)
    text = lambda n: " ".join(rng.choice(words[4:]) for _ in range(n))   # noqa: E731
    # prompt: <bos> + 63 words; completions: 191 words + <eos>
    records = [{"prompt": text(prompt - 1), "chosen": text(completion - 1), "rejected": text(completion - 1)}
               for _ in range(pairs)]
    return tok, model, records


def _ours_inputs(size) -> dict:
    from rlhf_fast.trainer.dpo_config import DPOConfig
    from rlhf_fast.trainer.dpo import DPOTrainer
    tok, model, records = _assets(*size)
    cfg = DPOConfig(out_dir=tempfile.mkdtemp(prefix="dpo_bench_"), batch_size=size[0],
                    micro_batch_size=size[0] // ACCUM, beta=BETA, lr=1e-6, max_steps=1000, progress=False)
    trainer = DPOTrainer(cfg, model, tok, records)
    t0 = time.perf_counter()
    trainer.ref_logps = trainer.compute_reference()
    return {"trainer": trainer, "step": 0, "ref_cache_s": time.perf_counter() - t0}


def _ours(state: dict) -> None:
    state["trainer"].train_step(state["step"])
    state["step"] += 1


def _trl_inputs(size, accum: int) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    tok, model, records = _assets(*size)
    args = DPOConfig(output_dir=tempfile.mkdtemp(prefix="dpo_bench_trl_"), per_device_train_batch_size=size[0] // accum,
                     gradient_accumulation_steps=accum, beta=BETA, max_length=None, max_steps=1,
                     learning_rate=1e-6, use_cpu=True, report_to="none", bf16=False, save_strategy="no",
                     logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0)
    data = [{"prompt": r["prompt"], "chosen": " " + r["chosen"], "rejected": " " + r["rejected"]} for r in records]
    # TRL loads its reference copy from the policy's path; an in-memory policy gets the same copy directly
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                         train_dataset=Dataset.from_list(data), processing_class=tok)
    return {"trainer": trainer}


def _trl(state: dict) -> None:
    state["trainer"].train()


def _liger_inputs(size) -> dict:
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    from rlhf_fast.data.collators import collate_comparisons
    tok, model, records = _assets(*size)
    batch = collate_comparisons(records, tok)                 # row 2i chosen, 2i+1 rejected
    n = 2 * size[0]
    order = torch.cat([torch.arange(0, n, 2), torch.arange(1, n, 2)])                    # Liger: chosen first
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


def _row_extra(impl: str, inputs: dict) -> dict:
    out = {"micro_batches": 1 if impl in ("trl", "liger") else ACCUM,
           "torch_threads": torch.get_num_threads()}
    if impl == "rlhf_fast" and impl in inputs:
        out["ref_cache_s"] = round(inputs[impl]["ref_cache_s"], 2)
    return out


def _flops(pairs: int, tokens: int) -> float:
    """Forward + backward matmul FLOPs of the 2 x pairs trained sequences: 6 N per token, N = the parameters of
    the linear layers and the lm_head (the input embedding is a lookup, no FLOPs), plus causal attention,
    6 L H T per token (QK^T and AV: 4 L H T forward over the full square, half of it causal, x3 with backward)."""
    from rlhf_fast.models import tiny_llama_config
    from transformers import LlamaForCausalLM
    config = tiny_llama_config(VOCAB, 512, 6, 1408)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    n = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    attention = 6 * config.num_hidden_layers * config.hidden_size * tokens
    return (6 * n + attention) * 2 * pairs * tokens


def cases(quick: bool, device: str) -> list[Case]:
    size = SIZES[quick]
    pairs, tokens = size[0], size[1] + size[2]
    impls = {"rlhf_fast": lazy_impl("rlhf_fast", lambda: _ours_inputs(size), _ours)}
    if importlib.util.find_spec("trl") is not None:
        if quick:                                      # full size: beyond this machine's memory (docstring)
            impls["trl"] = lazy_impl("trl", lambda: _trl_inputs(size, 1), _trl)
        impls[f"trl-accum{ACCUM}"] = lazy_impl(f"trl-accum{ACCUM}", lambda: _trl_inputs(size, ACCUM), _trl)
    if importlib.util.find_spec("liger_kernel") is not None:
        impls["liger"] = lazy_impl("liger", lambda: _liger_inputs(size), _liger)
    return [Case(name=f"M50xP{pairs}xT{tokens}", make_inputs=dict, impls=impls, tokens=2 * pairs * tokens,
                 flops=_flops(pairs, tokens), min_reps=1, budget_s=0.0, memory_scope="process",
                 row_extra=_row_extra, size_label="pairs x tokens")]
