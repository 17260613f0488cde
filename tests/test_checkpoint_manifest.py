"""Checkpoints that survive a bad disk: the newest checkpoint of a real SFT run is corrupted for real
(truncated weights, a flipped byte, a missing file, a garbage or missing manifest); ``--resume`` says so,
falls back to the newest complete checkpoint, and continues to exactly the uninterrupted result; nothing
already saved is deleted."""
import json
import os
import shutil

import pytest

from _trainer_common import one_thread, params_equal, tiny_policy, tokenizer  # noqa: F401  (autouse fixture)
from rlhf_fast.cli import main as cli_main
from rlhf_fast.data import SortTask, write_jsonl
from rlhf_fast.models import save_model
from rlhf_fast.trainer.checkpoint import (MANIFEST, CheckpointError, list_checkpoints, newest_complete_checkpoint,
                                          verify_checkpoint, write_json_atomic)
from rlhf_fast.trainer.config import SFTConfig
from rlhf_fast.trainer.sft import SFTTrainer

STEPS = 4


def _truncate(d):
    with open(d / "policy.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(d / "policy.safetensors") // 2)


def _flip_byte(d):
    data = bytearray((d / "policy.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (d / "policy.safetensors").write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated": (_truncate, "policy.safetensors is"),
    "flipped_byte": (_flip_byte, "policy.safetensors does not match its sha256"),
    "missing_file": (lambda d: (d / "state.pt").unlink(), "state.pt is missing"),
    "garbage_manifest": (lambda d: (d / MANIFEST).write_bytes(b"\x00{not json"), "manifest.json is not valid JSON"),
    "manifest_missing": (lambda d: (d / MANIFEST).unlink(), "no manifest.json"),
}


def _config(out_dir, **kw):
    return SFTConfig(out_dir=str(out_dir), lr=3e-3, batch_size=16, max_steps=STEPS, save_every=1, keep_last=3,
                     progress=False, **kw)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """An uninterrupted 4-step SFT run (checkpoints 2, 3, 4) and its final weights."""
    root = tmp_path_factory.mktemp("ckpt")
    tok = tokenizer()
    model = tiny_policy(tok)
    SFTTrainer(_config(root / "run"), model, tok, SortTask().sft_examples(64, seed=0)).train()
    return root / "run", model


def test_manifest_lists_every_file_with_size_and_sha256(finished):
    run, _ = finished
    assert [s for s, _ in list_checkpoints(run)] == [2, 3, 4]
    d = run / "checkpoints" / "step_000004"
    manifest = json.loads((d / MANIFEST).read_text())
    assert manifest["step"] == 4 and sorted(manifest["files"]) == ["policy.safetensors", "state.pt"]
    assert manifest["files"]["state.pt"]["size"] == os.path.getsize(d / "state.pt")
    assert all(verify_checkpoint(p) is None for _, p in list_checkpoints(run))


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_resume_falls_back_to_newest_complete_checkpoint(finished, tmp_path, capfd, corruption):
    run, final_model = finished
    out = tmp_path / "run"
    shutil.copytree(run, out)
    corrupt, reason = CORRUPTIONS[corruption]
    corrupt(out / "checkpoints" / "step_000004")
    assert reason in verify_checkpoint(out / "checkpoints" / "step_000004")
    tok = tokenizer()
    model = tiny_policy(tok, seed=5)                       # different initial weights: all must come from step 3
    trainer = SFTTrainer(_config(out), model, tok, SortTask().sft_examples(64, seed=0))
    records = trainer.train(resume=True)
    err = capfd.readouterr().err
    assert "step_000003, the newest complete checkpoint; skipped step_000004: " + reason in err
    assert [r["step"] for r in records] == [1, 2, 3, 4]   # metrics of steps 1-3 kept, step 4 redone once
    assert params_equal(model, final_model)                # the same result as the uninterrupted run
    assert [s for s, _ in list_checkpoints(out)] == [2, 3, 4]   # nothing saved was lost; step 4 rewritten
    assert verify_checkpoint(out / "checkpoints" / "step_000004") is None


def test_no_complete_checkpoint_is_an_error_naming_each(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    for _, path in list_checkpoints(out):
        os.remove(os.path.join(path, MANIFEST))
    with pytest.raises(CheckpointError, match=r"no complete checkpoint in .*step_000004: no manifest.json.*"
                                              r"step_000002: no manifest.json"):
        newest_complete_checkpoint(out)
    assert len(list_checkpoints(out)) == 3                 # left on disk


def test_cli_resume_after_truncated_weights(finished, tmp_path, capfd):
    """The issue's case through ``rlhf-fast sft --resume`` (``rlhf_fast.cli.main``; test_trainer_kill.py runs
    --resume in a real process): a truncated newest policy.safetensors."""
    tok = tokenizer()
    save_model(tiny_policy(tok), tok, tmp_path / "policy")
    write_jsonl(tmp_path / "sft.jsonl", SortTask().sft_examples(64, seed=0))
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    _truncate(out / "checkpoints" / "step_000004")
    argv = ["sft", "--model", str(tmp_path / "policy"), "--data", str(tmp_path / "sft.jsonl"), "--out-dir", str(out),
            "--lr", "3e-3", "--batch-size", "16", "--max-steps", str(STEPS), "--save-every", "1", "--keep-last", "3",
            "--progress", "false", "--resume"]
    assert cli_main(argv) == 0
    err = capfd.readouterr().err
    assert "resuming from" in err and "skipped step_000004: policy.safetensors is" in err
    assert newest_complete_checkpoint(out).endswith("step_000004")
    for _, path in list_checkpoints(out):
        os.remove(os.path.join(path, MANIFEST))
    assert cli_main(argv) == 2                              # nothing complete left: one line, exit 2
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --resume: no complete checkpoint in ")


def test_json_written_all_or_nothing(tmp_path):
    """``write_json_atomic`` (manifests, the distributed driver's ``driver.json``, which marks its checkpoint
    complete): a write that dies midway leaves the old file, or none, never a truncated one a resume would read."""
    target = tmp_path / "driver.json"
    with pytest.raises(TypeError):
        write_json_atomic(str(target), {"step": 2, "bad": object()})       # dies after writing part of the JSON
    assert not target.exists()
    write_json_atomic(str(target), {"step": 2})
    with pytest.raises(TypeError):
        write_json_atomic(str(target), {"step": 4, "bad": object()})
    assert json.loads(target.read_text()) == {"step": 2}
