"""Examples longer than the model's context, handled per ``--overlong reject | truncate | drop``.

Lengths are counted as the collators encode (``rlhf_fast.data.collators``): a prompt with the tokenizer's
special tokens, a completion plus its ``<eos>``. With ``C`` the context (max positions) and ``N`` the
``max_new_tokens`` of a rollout::

    prompts (PPO)              len(prompt) + N <= C
    SFT examples, comparisons  len(prompt) + len(completion) + 1 <= C      (each completion of a comparison)

    reject     stop with one line ``path:line: ...`` naming the record          (the default)
    drop       skip the record; one line on stderr says how many were skipped
    truncate   cut to fit: a prompt keeps its last tokens; an SFT example or comparison keeps the first
               tokens of each completion (the <eos> is still appended), and its prompt whole, unless the
               prompt alone leaves no room for a completion token: then its last C // 2 tokens

Texts are cut at token boundaries (the tokenizer's character offsets; a fast tokenizer is needed), so the
cut record re-encodes to at most the budget.
"""
from __future__ import annotations

import sys

from rlhf_fast.checks import InputError
from rlhf_fast.data.collators import encode_completion, encode_prompt

MODES = ("reject", "truncate", "drop")


def cut_text(tokenizer, text: str, max_tokens: int, keep_end: bool, special: bool) -> str:
    """The longest start (or end, ``keep_end``) of ``text`` that encodes to at most ``max_tokens`` ids
    (``special``: counting the special tokens the tokenizer adds)."""
    def encode(t: str) -> dict:
        return tokenizer(t, add_special_tokens=special, return_offsets_mapping=True)

    if not getattr(tokenizer, "is_fast", False):
        raise InputError("--overlong truncate needs a fast tokenizer (character offsets); use reject or drop")
    enc = encode(text)
    if len(enc["input_ids"]) <= max_tokens:
        return text
    n_special = sum(1 for a, b in enc["offset_mapping"] if a == b)
    spans = [(a, b) for a, b in enc["offset_mapping"] if a != b]
    keep = max_tokens - n_special
    while keep > 0:
        cut = text[spans[-keep][0]:] if keep_end else text[:spans[keep - 1][1]]
        if len(encode(cut)["input_ids"]) <= max_tokens:
            return cut
        keep -= 1
    return ""


def _prompt_len(tokenizer, text: str) -> int:
    return len(encode_prompt(tokenizer, text))


def _completion_len(tokenizer, text: str) -> int:
    return len(encode_completion(tokenizer, text))


def _completion_keys(rec: dict) -> list:
    """Where a record's completions are: ``["completion"]``, ``["chosen", "rejected"]`` or list indices."""
    if "completions" in rec:
        return list(range(len(rec["completions"])))
    return ["completion"] if "completion" in rec else ["chosen", "rejected"]


def _get(rec: dict, k):
    return rec["completions"][k] if isinstance(k, int) else rec[k]


def _over(rec: dict, tokenizer, context: int, reserve: int) -> str | None:
    """Why ``rec`` does not fit (``None`` if it does)."""
    p = _prompt_len(tokenizer, rec["prompt"])
    if reserve:
        return None if p + reserve <= context else f"prompt is {p} tokens; + max_new_tokens {reserve}"
    worst = max(_completion_len(tokenizer, _get(rec, k)) for k in _completion_keys(rec))
    return None if p + worst <= context else f"prompt + completion + eos is {p} + {worst} tokens"


def _truncate(rec: dict, tokenizer, context: int, reserve: int) -> dict:
    rec = dict(rec, completions=list(rec["completions"])) if "completions" in rec else dict(rec)
    if reserve:
        rec["prompt"] = cut_text(tokenizer, rec["prompt"], context - reserve, keep_end=True, special=True)
        return rec
    if _prompt_len(tokenizer, rec["prompt"]) + 2 > context:
        rec["prompt"] = cut_text(tokenizer, rec["prompt"], context // 2, keep_end=True, special=True)
    room = context - _prompt_len(tokenizer, rec["prompt"]) - 1      # - 1: the <eos>
    for k in _completion_keys(rec):
        text = cut_text(tokenizer, _get(rec, k), room, keep_end=False, special=False)
        if isinstance(k, int):
            rec["completions"][k] = text
        else:
            rec[k] = text
    return rec


def fit_to_context(items: list[tuple[int, dict]], tokenizer, context: int | None, mode: str, path: str,
                   model_arg: str, reserve: int = 0) -> list[dict]:
    """Records of ``items`` (``(line, record)`` from ``read_jsonl_lines(path)``) that fit ``context``, per
    ``mode`` (see the module docstring). ``reserve``: tokens generated after a prompt (PPO's
    ``max_new_tokens``); 0 for SFT examples and comparisons. ``model_arg`` names the model whose context it is."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if context is None:
        return [rec for _, rec in items]
    if reserve and reserve >= context:
        raise InputError(f"--max-new-tokens {reserve} leaves no room for a prompt in the context of "
                         f"{model_arg} ({context} tokens)")
    out, dropped = [], 0
    for line, rec in items:
        why = _over(rec, tokenizer, context, reserve)
        if why is None:
            out.append(rec)
        elif mode == "reject":
            raise InputError(f"{path}:{line}: {why} > {context}, the context of {model_arg}; shorten it or "
                             f"pass --overlong truncate or --overlong drop")
        elif mode == "drop":
            dropped += 1
        else:
            out.append(_truncate(rec, tokenizer, context, reserve))
    if dropped:
        print(f"[rlhf-fast] --overlong drop: skipped {dropped} of {len(items)} records of {path} longer than "
              f"the context of {model_arg} ({context} tokens)", file=sys.stderr)
    if not out:
        raise InputError(f"{path}: every record is longer than the context of {model_arg} ({context} tokens)")
    return out
