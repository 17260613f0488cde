"""Checkpoints: ``<out_dir>/checkpoints/step_<N>/`` with

- ``<name>.safetensors`` for each model's state dict (policy, critic, reward model, ...);
- ``state.pt``: optimizer / scheduler state dicts, KL controller, RNG states, step, data cursor and anything
  else the trainer needs, written with ``torch.save`` and read back with ``torch.load(weights_only=True)``;
- ``manifest.json``, written last: ``{"format": 1, "step": N, "files": {name: {"size": bytes, "sha256": hex}}}``.

A checkpoint is complete only when its manifest is there and every file it lists has that size and sha256.
Writes are atomic twice over: everything goes to a hidden temporary directory (the manifest last, itself via
a temporary file and ``os.replace``) that is renamed into place only when complete, so a SIGKILL mid-save
leaves the previous checkpoint intact (the partial one is ignored and cleaned up on the next save).
``--resume`` (:func:`newest_complete_checkpoint`) verifies the newest checkpoint and falls back to the newest
complete one, saying which and why; a checkpoint it skips is left on disk. Saving step N prunes only older
checkpoints, to the newest ``keep_last`` including N, so a fallback never deletes what it resumed from.
A directory without a manifest (an interrupted copy, a lost file, or a checkpoint of a version before
manifests) is not complete: it is skipped, never loaded unverified.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file

STEP_RE = re.compile(r"^step_(\d+)$")
MANIFEST = "manifest.json"
FORMAT = 1


class CheckpointError(RuntimeError):
    """No usable checkpoint: the message names each one tried and what is wrong with it."""


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def checkpoint_root(out_dir: str | os.PathLike) -> str:
    return os.path.join(out_dir, "checkpoints")


def list_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, str]]:
    """Checkpoint directories (complete or not) as (step, path), oldest first."""
    root = checkpoint_root(out_dir)
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, d)) for d in os.listdir(root) if (m := STEP_RE.match(d))]
    return sorted(found)


def latest_checkpoint(out_dir: str | os.PathLike) -> str | None:
    """The newest checkpoint directory, unverified (see :func:`newest_complete_checkpoint`)."""
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str, obj) -> None:
    """``obj`` as JSON at ``path``, all or nothing: a hidden temporary file, fsynced, renamed into place, then the
    directory fsynced (a process killed mid-write leaves no file, never a truncated one)."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(folder)


def write_manifest(path: str, step: int) -> None:
    """Size and sha256 of every file of the checkpoint directory ``path``, into ``manifest.json`` (atomic)."""
    files = {f: {"size": os.path.getsize(os.path.join(path, f)), "sha256": _sha256(os.path.join(path, f))}
             for f in sorted(os.listdir(path)) if f != MANIFEST and not f.startswith(".")}
    write_json_atomic(os.path.join(path, MANIFEST), {"format": FORMAT, "step": step, "files": files})


def verify_checkpoint(path: str | os.PathLike) -> str | None:
    """What makes the checkpoint at ``path`` incomplete, or ``None`` when it is complete."""
    path = os.fspath(path)
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return f"no {MANIFEST} (an interrupted save, a lost file, or a checkpoint older than manifests)"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"{MANIFEST} is not valid JSON"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (not isinstance(files, dict) or not files or manifest.get("format") != FORMAT
            or not all(isinstance(e, dict) and {"size", "sha256"} <= e.keys() for e in files.values())):
        return f"{MANIFEST} is not a format-{FORMAT} manifest"
    m = STEP_RE.match(os.path.basename(path))
    if m and manifest.get("step") != int(m.group(1)):
        return f"{MANIFEST} is for step {manifest.get('step')!r}"
    for name, entry in files.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        size = os.path.getsize(file)
        if size != entry["size"]:
            return f"{name} is {size} bytes, the manifest says {entry['size']}"
        if _sha256(file) != entry["sha256"]:
            return f"{name} does not match its sha256"
    return None


def newest_complete_checkpoint(out_dir: str | os.PathLike) -> str | None:
    """The newest complete checkpoint (``None`` when there is no checkpoint at all). Newer incomplete ones
    are skipped with a line on stderr naming each and why; :class:`CheckpointError` if none is complete."""
    skipped = []
    for _, path in reversed(list_checkpoints(out_dir)):
        why = verify_checkpoint(path)
        if why is None:
            if skipped:
                print(f"[rlhf-fast] resuming from {path}, the newest complete checkpoint; skipped "
                      + "; ".join(f"{p}: {w}" for p, w in skipped), file=sys.stderr)
            return path
        skipped.append((os.path.basename(path), why))
    if skipped:
        raise CheckpointError(f"--resume: no complete checkpoint in {checkpoint_root(out_dir)} ("
                              + "; ".join(f"{p}: {w}" for p, w in skipped) + "); start a new run without --resume "
                              "or in a new --out-dir")
    return None


def _state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # clone shared storages (tied embeddings) so safetensors accepts them
    seen, out = set(), {}
    for k, v in model.state_dict().items():
        ptr = v.data_ptr()
        out[k] = v.detach().clone().contiguous() if ptr in seen else v.detach().contiguous()
        seen.add(ptr)
    return out


def save_checkpoint(out_dir: str | os.PathLike, step: int, models: dict[str, torch.nn.Module], state: dict,
                    keep_last: int = 2) -> str:
    """Atomically write checkpoint ``step`` (manifest last); prune older ones so that the newest
    ``keep_last`` up to ``step`` remain. Returns its path."""
    root = checkpoint_root(out_dir)
    os.makedirs(root, exist_ok=True)
    for d in os.listdir(root):  # leftovers of a save that was killed
        if d.startswith(".tmp-"):
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    final = os.path.join(root, f"step_{step:06d}")
    tmp = os.path.join(root, f".tmp-step_{step:06d}-{os.getpid()}")
    os.makedirs(tmp)
    for name, model in models.items():
        save_file(_state_dict(model), os.path.join(tmp, f"{name}.safetensors"))
    torch.save({**state, "step": step, "rng": rng_state()}, os.path.join(tmp, "state.pt"))
    for f in os.listdir(tmp):
        _fsync(os.path.join(tmp, f))
    write_manifest(tmp, step)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(root)
    older = [path for s, path in list_checkpoints(out_dir) if s < step]
    for old in older[:max(len(older) - (max(keep_last, 1) - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike, models: dict[str, torch.nn.Module], verify: bool = True) -> dict:
    """Load weights into ``models`` (strict) and return the state dict (RNG states restored).
    ``verify``: first check the manifest (:class:`CheckpointError` if the checkpoint is incomplete)."""
    why = verify_checkpoint(path) if verify else None
    if why is not None:
        raise CheckpointError(f"checkpoint {path} is incomplete: {why}")
    for name, model in models.items():
        model.load_state_dict(load_file(os.path.join(path, f"{name}.safetensors")), strict=True)
    state = torch.load(os.path.join(path, "state.pt"), weights_only=True)
    set_rng_state(state["rng"])
    return state
