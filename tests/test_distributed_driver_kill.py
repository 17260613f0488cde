"""The driver of a distributed run SIGKILLed for real: ``rlhf-fast ppo --learners 2`` in a subprocess (its own local
Ray cluster) is killed after its second sharded checkpoint; no actor and no shared-memory weight region outlives
it, and ``--learners 1 --resume`` continues from that checkpoint on one learner rank, every step logged once."""
import glob
import json
import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("ray")

from _trainer_common import sigkill_when, tiny_policy, tokenizer  # noqa: E402
from rlhf_fast.data import SortTask, write_jsonl  # noqa: E402
from rlhf_fast.models import RewardModel, save_model  # noqa: E402

pytestmark = pytest.mark.slow
STEPS = 4
ROLES = (b"ray::LearnerRole", b"ray::EngineWorker")


def _cmd(root, learners: int, resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "rlhf_fast", "ppo", "--model", str(root / "policy"), "--reward-model",
           str(root / "rm"), "--prompts", str(root / "prompts.jsonl"), "--out-dir", str(root / "run"),
           "--learners", str(learners), "--engines", "1", "--engine", "hf", "--cpus_per_actor", "0.5",
           "--estimator", "grpo", "--samples_per_prompt", "2", "--batch_size", "4", "--minibatch_size", "8",
           "--ppo_epochs", "1", "--max_new_tokens", "4", "--kl_coef", "0.0", "--steps", str(STEPS),
           "--save_every", "1", "--progress", "false"]
    return cmd + (["--resume"] if resume else [])


def _env() -> dict:
    path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "RAY_AUTH_MODE": "disabled"}


def _role_pids() -> list[int]:
    """Processes of a learner or engine actor on this machine (Ray titles its workers ``ray::Class``)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(ROLES):
                    pids.append(int(pid))
        except OSError:
            continue
    return pids


def test_killed_driver_resumes_on_one_learner(tmp_path):
    tok = tokenizer()
    save_model(tiny_policy(tok, seed=0, layers=2), tok, tmp_path / "policy")
    RewardModel.from_causal_lm(tiny_policy(tok, seed=1)).save_pretrained(tmp_path / "rm", tok)
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in SortTask().prompts(16, seed=0)])
    regions = set(glob.glob("/dev/shm/rlhf_fast_weights_*"))
    assert not _role_pids(), "another run's actors are alive on this machine"

    proc = subprocess.Popen(_cmd(tmp_path, 2), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sigkill_when(proc, tmp_path / "run" / "checkpoints" / "step_000002" / "driver.json")
    assert not (tmp_path / "run" / "checkpoints" / f"step_{STEPS:06d}").exists(), "finished before the kill"
    deadline = time.time() + 60
    while _role_pids() and time.time() < deadline:       # the actors share the driver's fate
        time.sleep(0.5)
    assert not _role_pids(), "actors outlived their driver"
    assert set(glob.glob("/dev/shm/rlhf_fast_weights_*")) == regions   # unlinked once every end had mapped it

    res = subprocess.run(_cmd(tmp_path, 1, resume=True), env=_env(), capture_output=True, timeout=600)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))          # continued, each step logged once
    assert [r["weight_version"] for r in records] == list(range(1, STEPS + 1))
    assert (tmp_path / "run" / "policy" / "config.json").exists()
