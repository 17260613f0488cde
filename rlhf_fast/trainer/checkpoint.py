"""Checkpoints: ``<out_dir>/checkpoints/step_<N>/`` with

- ``<name>.safetensors`` for each model's state dict (policy, critic, reward model, ...);
- ``state.pt``: optimizer / scheduler state dicts, KL controller, RNG states, step, data cursor and anything
  else the trainer needs, written with ``torch.save`` and read back with ``torch.load(weights_only=True)``.

Writes are atomic: everything goes to a hidden temporary directory that is renamed into place only when
complete, so a SIGKILL mid-save leaves the previous checkpoint intact (the partial one is ignored and cleaned
up on the next save). The last ``keep_last`` checkpoints are kept.
"""
from __future__ import annotations

import os
import random
import re
import shutil

import torch
from safetensors.torch import load_file, save_file

STEP_RE = re.compile(r"^step_(\d+)$")


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def checkpoint_root(out_dir: str | os.PathLike) -> str:
    return os.path.join(out_dir, "checkpoints")


def list_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, str]]:
    """Complete checkpoints as (step, path), oldest first."""
    root = checkpoint_root(out_dir)
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, d)) for d in os.listdir(root) if (m := STEP_RE.match(d))]
    return sorted(found)


def latest_checkpoint(out_dir: str | os.PathLike) -> str | None:
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


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
    """Atomically write checkpoint ``step``; prune to the newest ``keep_last``. Returns its path."""
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
        with open(os.path.join(tmp, f), "rb") as fh:
            os.fsync(fh.fileno())
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(tmp, final)
    for _, old in list_checkpoints(out_dir)[:-max(keep_last, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike, models: dict[str, torch.nn.Module]) -> dict:
    """Load weights into ``models`` (strict) and return the state dict (RNG states restored)."""
    for name, model in models.items():
        model.load_state_dict(load_file(os.path.join(path, f"{name}.safetensors")), strict=True)
    state = torch.load(os.path.join(path, "state.pt"), weights_only=True)
    set_rng_state(state["rng"])
    return state
