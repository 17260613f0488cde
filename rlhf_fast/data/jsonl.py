"""JSONL datasets: prompts ``{"prompt"}``, SFT examples ``{"prompt", "completion"}``, pairwise comparisons
``{"prompt", "chosen", "rejected"[, "margin"]}`` and best-of-K comparisons ``{"prompt", "completions", "best"}``.

Every malformed line raises :class:`JSONLError` naming the file and the 1-based line number.
"""
from __future__ import annotations

import json
import os
from typing import Iterable

SCHEMAS = {
    "prompts": {"prompt": str},
    "sft": {"prompt": str, "completion": str},
    "pairwise": {"prompt": str, "chosen": str, "rejected": str},
    "best_of_k": {"prompt": str, "completions": list, "best": int},
}


class JSONLError(ValueError):
    """A malformed line in a JSONL dataset: ``path:line: reason``."""

    def __init__(self, path: str | os.PathLike, line: int, reason: str):
        self.path, self.line = str(path), line
        super().__init__(f"{path}:{line}: {reason}")


def _check(rec, schema: dict, path, lineno: int) -> None:
    if not isinstance(rec, dict):
        raise JSONLError(path, lineno, f"expected a JSON object, got {type(rec).__name__}")
    for key, typ in schema.items():
        if key not in rec:
            raise JSONLError(path, lineno, f"missing key {key!r} (expected keys {sorted(schema)})")
        if not isinstance(rec[key], typ) or (typ is int and isinstance(rec[key], bool)):
            raise JSONLError(path, lineno, f"key {key!r} must be {typ.__name__}, got {type(rec[key]).__name__}")
    if "completions" in schema:
        if len(rec["completions"]) < 2 or not all(isinstance(c, str) for c in rec["completions"]):
            raise JSONLError(path, lineno, "'completions' must be a list of at least 2 strings")
        if not 0 <= rec["best"] < len(rec["completions"]):
            raise JSONLError(path, lineno, f"'best' = {rec['best']} is out of range for "
                                           f"{len(rec['completions'])} completions")


def read_jsonl(path: str | os.PathLike, kind: str | None = None) -> list[dict]:
    """Records of ``path``; with ``kind`` (a key of :data:`SCHEMAS`) each is checked against its schema.
    ``kind="comparisons"`` accepts pairwise and best-of-K lines (each line its own form)."""
    return [rec for _, rec in read_jsonl_lines(path, kind)]


def read_jsonl_lines(path: str | os.PathLike, kind: str | None = None) -> list[tuple[int, dict]]:
    """:func:`read_jsonl` with each record's 1-based line number: ``[(line, record), ...]``."""
    if kind is not None and kind not in SCHEMAS and kind != "comparisons":
        raise ValueError(f"kind must be one of {sorted(SCHEMAS) + ['comparisons']}, got {kind!r}")
    records = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise JSONLError(path, lineno, "not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise JSONLError(path, lineno, f"invalid JSON ({err.msg} at column {err.colno})") from None
            if kind == "comparisons":
                schema = SCHEMAS["best_of_k" if isinstance(rec, dict) and "completions" in rec else "pairwise"]
            else:
                schema = SCHEMAS.get(kind)
            if schema is not None:
                _check(rec, schema, path, lineno)
            records.append((lineno, rec))
    if not records:
        raise JSONLError(path, 0, "file has no records")
    return records


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
