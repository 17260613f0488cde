"""HFEngine: rollouts with transformers ``generate`` — the fallback where vLLM is absent.

It samples from π_τ exactly as vLLM does (temperature, then top-k, then top-p) and reports
``log softmax(processed scores)[sampled token]``, the same quantity VLLMEngine reports with
``logprobs_mode="processed_logprobs"`` (greedy: the unscaled model's log-probs).

The engine generates with the learner's module itself (no copy): ``sync_weights(model)`` only rebinds
to ``model`` when it is a different module, and bumps ``weight_version``.
"""
from __future__ import annotations

import contextlib

import torch

from rlhf_fast.rollout.base import RolloutEngine, Sample, SamplingConfig
from rlhf_fast.rollout.batch import pack


def _special_ids(model, tokenizer, pad_token_id, eos_token_id) -> tuple[int, int | None]:
    gen = getattr(model, "generation_config", None)
    if eos_token_id is None:
        eos_token_id = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        eos_token_id = eos_token_id if eos_token_id is not None else getattr(gen, "eos_token_id", None)
        if isinstance(eos_token_id, (list, tuple)):
            eos_token_id = eos_token_id[0] if eos_token_id else None
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        pad_token_id = pad_token_id if pad_token_id is not None else getattr(gen, "pad_token_id", None)
        pad_token_id = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    return int(pad_token_id), eos_token_id


class HFEngine(RolloutEngine):
    """``HFEngine(model, tokenizer=None, pad_token_id=None, eos_token_id=None, max_model_len=None)``.

    Special ids default to the tokenizer's, then the model's generation config; pad falls back to EOS.
    ``max_model_len`` defaults to the config's ``max_position_embeddings``.
    """

    def __init__(self, model: torch.nn.Module, tokenizer=None, *, pad_token_id: int | None = None,
                 eos_token_id: int | None = None, max_model_len: int | None = None,
                 truncate_prompts: bool = False):
        pad, eos = _special_ids(model, tokenizer, pad_token_id, eos_token_id)
        if max_model_len is None:
            max_model_len = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        super().__init__(pad_token_id=pad, eos_token_id=eos, max_model_len=max_model_len,
                         truncate_prompts=truncate_prompts)
        self.model = model

    def _sync_weights(self, model: torch.nn.Module) -> None:
        self.model = model

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], cfg: SamplingConfig) -> list[Sample]:
        device = next(self.model.parameters()).device
        ids, _, attn, _ = pack(prompts, [[]] * len(prompts), self.pad_token_id)
        P = ids.shape[1]
        attn = attn[:, :P].long()
        stops = ([self.eos_token_id] if self.eos_token_id is not None else []) + list(cfg.stop_token_ids)
        kwargs = dict(do_sample=False) if cfg.greedy else dict(
            do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k or 0)
        rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else []) \
            if cfg.seed is not None else contextlib.nullcontext()
        was_training = self.model.training
        self.model.eval()
        try:
            with rng:
                if cfg.seed is not None:
                    torch.manual_seed(cfg.seed)
                out = self.model.generate(
                    input_ids=ids.to(device), attention_mask=attn.to(device), max_new_tokens=cfg.max_new_tokens,
                    min_new_tokens=0, num_return_sequences=cfg.n, eos_token_id=stops or None,
                    pad_token_id=self.pad_token_id, output_scores=True, return_dict_in_generate=True,
                    **kwargs)
        finally:
            self.model.train(was_training)
        tokens = out.sequences[:, P:].cpu()  # [B*n, R]
        # scores[t]: [B*n, V] processed logits at step t (temperature / top-k / top-p applied)
        logps = torch.stack([s.float().log_softmax(-1).gather(1, tokens[:, t:t + 1].to(s.device)).squeeze(1).cpu()
                             for t, s in enumerate(out.scores)], dim=1) if out.scores else torch.zeros_like(tokens, dtype=torch.float)
        stop_set = set(stops)
        samples = []
        for row in range(tokens.shape[0]):
            toks = tokens[row].tolist()
            end = next((t + 1 for t, tok in enumerate(toks) if tok in stop_set), None)
            reason = "stop" if end is not None else "length"
            end = end if end is not None else len(toks)
            samples.append(Sample(row // cfg.n, toks[:end], logps[row, :end].tolist(), reason))
        return samples
