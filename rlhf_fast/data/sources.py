"""Prompts, SFT records and comparisons from local Hugging Face ``datasets`` sources, with a column mapping
and chat-formatted records.

Sources (``path``): a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (its
``split``), a ``.parquet`` file, or JSON lines (``.jsonl`` / ``.json``; without a column mapping or chat records
this is exactly :func:`rlhf_fast.data.read_jsonl`). ``columns`` maps the record keys to the source's columns,
e.g. ``{"prompt": "question", "chosen": "good"}``; unmapped keys keep their names. Records come out in the
JSONL schemas of :mod:`rlhf_fast.data.jsonl` (``prompts``, ``sft``, ``pairwise``; ``comparisons`` = pairwise).

Chat records: a value ``[{"role": ..., "content": ...}, ...]`` is rendered with the tokenizer's
``apply_chat_template``. For a prompt ``p`` (messages) and a completion ``c`` (messages, or a string = one
assistant message)::

    prompt_text     = template(p, add_generation_prompt=True)
    completion_text = template(p + c)[len(prompt_text):]      (the template must render p as a prefix)

so the response mask (the collators' completion tokens) starts exactly where the assistant's turn starts. A
leading ``bos_token`` is dropped from the prompt text when the tokenizer adds it itself, and a trailing
``eos_token`` from the completion text, since the collator appends ``<eos>`` (no doubled specials).

Every missing or malformed value raises :class:`DataError` naming the file, the row (1-based; the line for
JSON lines) and the column.
"""
from __future__ import annotations

import os

from rlhf_fast.data.jsonl import JSONLError, read_jsonl_lines

__all__ = ["DataError", "KINDS", "load_records", "read_source", "render_chat"]

KINDS = {"prompts": ("prompt",), "sft": ("prompt", "completion"), "pairwise": ("prompt", "chosen", "rejected"),
         "comparisons": ("prompt", "chosen", "rejected")}
_COMPLETIONS = ("completion", "chosen", "rejected")


class DataError(JSONLError):
    """A missing or malformed value: ``path: row N, column 'c': reason`` (``line N`` in JSON lines)."""

    def __init__(self, path, row: int, column: str | None, reason: str):
        self.path, self.line, self.column = str(path), row, column
        unit = "row" if os.path.isdir(path) or str(path).endswith(".parquet") else "line"
        where = f"{unit} {row}" + (f", column {column!r}" if column is not None else "")
        ValueError.__init__(self, f"{path}: {where}: {reason}")


def _is_chat(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) for m in value)


def _check_messages(messages, path, row, column) -> list[dict]:
    for k, m in enumerate(messages):
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(path, row, column, f"message {k} must have string 'role' and 'content', got {m!r}")
    return messages


def render_chat(tokenizer, prompt: list[dict], completion: list[dict] | str | None = None) -> tuple[str, str | None]:
    """``(prompt_text, completion_text)`` of chat messages (module docstring); completion None: prompt only."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("chat-formatted records need a tokenizer with a chat_template")
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    adds_bos = bos is not None and tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]
    strip = len(bos) if adds_bos and prompt_text.startswith(bos) else 0
    if completion is None:
        return prompt_text[strip:], None
    if isinstance(completion, str):
        completion = [{"role": "assistant", "content": completion}]
    full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    if not full.startswith(prompt_text):
        raise ValueError("the chat template does not render the prompt (with the generation prompt) as a prefix of "
                         "prompt + completion, so the response boundary is undefined")
    completion_text = full[len(prompt_text):].rstrip()
    eos = tokenizer.eos_token
    if eos and completion_text.endswith(eos):
        completion_text = completion_text[:-len(eos)]
    return prompt_text[strip:], completion_text


def _rows(path: str, split: str) -> list[tuple[int, dict]]:
    """``(row, value)`` pairs of the source (1-based rows; JSON lines: line numbers)."""
    if os.path.isdir(path):
        from datasets import DatasetDict, load_from_disk
        ds = load_from_disk(path)
        if isinstance(ds, DatasetDict):
            if split not in ds:
                raise DataError(path, 0, None, f"no split {split!r}; splits: {sorted(ds)}")
            ds = ds[split]
        return list(enumerate(ds.to_list(), start=1))
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        return list(enumerate(pq.read_table(path).to_pylist(), start=1))
    return read_jsonl_lines(path)


def _record(row, kind: str, columns: dict[str, str], tokenizer, path: str, n: int) -> dict:
    if not isinstance(row, dict):
        raise DataError(path, n, None, f"expected a mapping of columns, got {type(row).__name__}")
    values = {}
    for key in KINDS[kind]:
        col = columns.get(key, key)
        if col not in row or row[col] is None:
            raise DataError(path, n, col, f"missing (the {key!r} field; columns present: {sorted(row)})")
        value = row[col]
        if not isinstance(value, str) and not (_is_chat(value) and value):
            raise DataError(path, n, col, f"must be a string or a non-empty list of chat messages, "
                                          f"got {type(value).__name__}")
        values[key] = _check_messages(value, path, n, col) if _is_chat(value) else value
    if not _is_chat(values["prompt"]):
        bad = [k for k in _COMPLETIONS if _is_chat(values.get(k))]
        if bad:
            raise DataError(path, n, columns.get(bad[0], bad[0]), "chat messages need a chat-formatted prompt")
        return values
    if tokenizer is None:
        raise DataError(path, n, columns.get("prompt", "prompt"), "chat-formatted records need a tokenizer")
    out = {}
    try:
        out["prompt"], _ = render_chat(tokenizer, values["prompt"])
        for key in (k for k in _COMPLETIONS if k in values):
            _, out[key] = render_chat(tokenizer, values["prompt"], values[key])
    except ValueError as err:
        raise DataError(path, n, columns.get("prompt", "prompt"), str(err)) from None
    return out


def read_source(path: str | os.PathLike, kind: str, columns: dict[str, str] | None = None, tokenizer=None,
                split: str = "train") -> list[tuple[int, dict]]:
    """``(row, record)`` pairs of ``kind`` (``prompts`` | ``sft`` | ``pairwise`` | ``comparisons``) from ``path``,
    like :func:`rlhf_fast.data.jsonl.read_jsonl_lines` (whose schemas JSON lines without a mapping or chat
    records keep; ``comparisons`` then also takes best-of-K lines).

    ``columns``: record key -> source column; ``tokenizer``: renders chat-formatted values (required for them).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    path = os.fspath(path)
    columns = {k: v for k, v in (columns or {}).items() if v and v != k}
    unknown = sorted(set(columns) - set(KINDS[kind]) - {"margin"})
    if unknown:
        raise ValueError(f"columns: unknown record keys {unknown} for {kind!r} (keys: {list(KINDS[kind])})")
    rows = _rows(path, split)
    jsonl = not os.path.isdir(path) and not path.endswith(".parquet")
    if jsonl and not columns and not any(_is_chat(v) for _, r in rows if isinstance(r, dict) for v in r.values()):
        return read_jsonl_lines(path, kind)
    if not rows:
        raise DataError(path, 0, None, "no records")
    out = []
    margin = columns.get("margin", "margin")
    for n, row in rows:
        rec = _record(row, kind, columns, tokenizer, path, n)
        if kind in ("pairwise", "comparisons") and row.get(margin) is not None:
            rec["margin"] = float(row[margin])
        out.append((n, rec))
    return out


def load_records(path: str | os.PathLike, kind: str, columns: dict[str, str] | None = None, tokenizer=None,
                 split: str = "train") -> list[dict]:
    """The records of :func:`read_source`, without their row numbers."""
    return [rec for _, rec in read_source(path, kind, columns, tokenizer, split)]
