"""Collators. One layout everywhere, the rollout layout: the prompt left-padded to P, the completion
right-padded to R, ``input_ids = [prompt | completion]`` of length L = P + R.

Returned tensors (int64 ids, bool masks), all ``[B, L]``:
``input_ids``, ``attention_mask`` (real tokens), ``response_mask`` (completion tokens, incl. ``<eos>``).
"""
from __future__ import annotations

import torch

from rlhf_fast.rollout.batch import pack as pack_rollout


def pack(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad ``prompts``, right-pad ``completions`` and concatenate (lists of token-id lists):
    :func:`rlhf_fast.rollout.batch.pack` in the ``[B, L]`` sequence layout."""
    prompt_ids, response_ids, attn, resp = pack_rollout(prompts, completions, pad_id)
    return {"input_ids": torch.cat([prompt_ids, response_ids], 1), "attention_mask": attn,
            "response_mask": torch.cat([torch.zeros_like(prompt_ids, dtype=torch.bool), resp], 1)}


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt)["input_ids"]


def encode_completion(tokenizer, completion: str) -> list[int]:
    """Completion ids followed by ``<eos>`` (what the policy is trained, and sampled, to end with)."""
    return tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def collate_sft(records: list[dict], tokenizer) -> dict[str, torch.Tensor]:
    """``{"prompt", "completion"}`` records -> the packed batch; the loss is on the completion tokens."""
    return pack([encode_prompt(tokenizer, r["prompt"]) for r in records],
                [encode_completion(tokenizer, r["completion"]) for r in records], tokenizer.pad_token_id)


def as_best_of_k(record: dict) -> dict:
    """A pairwise record as best-of-2 (chosen first); best-of-K records pass through."""
    if "completions" in record:
        return record
    return {"prompt": record["prompt"], "completions": [record["chosen"], record["rejected"]], "best": 0,
            "margin": float(record.get("margin", 0.0))}


def collate_comparisons(records: list[dict], tokenizer) -> dict[str, torch.Tensor]:
    """Comparisons with K completions each (all records in a batch share K) -> the B*K packed sequences
    (record-major) plus ``best`` [B] (index of the preferred completion) and ``margin`` [B]."""
    records = [as_best_of_k(r) for r in records]
    ks = {len(r["completions"]) for r in records}
    if len(ks) != 1:
        raise ValueError(f"all comparisons in a batch must have the same number of completions, got {sorted(ks)}")
    prompts, completions = [], []
    for r in records:
        p = encode_prompt(tokenizer, r["prompt"])
        for c in r["completions"]:
            prompts.append(p)
            completions.append(encode_completion(tokenizer, c))
    batch = pack(prompts, completions, tokenizer.pad_token_id)
    batch["best"] = torch.tensor([r["best"] for r in records], dtype=torch.long)
    batch["margin"] = torch.tensor([float(r.get("margin", 0.0)) for r in records], dtype=torch.float32)
    batch["k"] = ks.pop()
    return batch


def collate_prompts(records: list[dict], tokenizer) -> list[list[int]]:
    """``{"prompt"}`` records -> token-id lists (what a rollout engine takes)."""
    return [encode_prompt(tokenizer, r["prompt"]) for r in records]
