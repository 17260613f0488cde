"""A learner rank killed for real (SIGKILL) mid-run on a real local Ray cluster: the run stops with one error that
names the rank, the step and the last complete checkpoint, no actor outlives it, and ``resume=True`` finishes the
run from that checkpoint through ``rlhf-fast ppo ... --resume``, every step logged once (a cut-short checkpoint
without driver.json is skipped). A learner killed under the CLI ends it with one ``error:`` line that says the same,
and the next ``--resume`` finishes the run."""
import json
import os
import signal
import threading
import time

import pytest

ray = pytest.importorskip("ray")

from _trainer_common import one_thread, sevens, tiny_policy, tokenizer  # noqa: E402,F401
from test_distributed_ray import PROMPTS, _cfg, cluster, model_dir  # noqa: E402,F401
from rlhf_fast.cli import main  # noqa: E402
from rlhf_fast.data import write_jsonl  # noqa: E402
from rlhf_fast.distributed.driver import DistributedPPO, LearnerDiedError  # noqa: E402
from rlhf_fast.models import RewardModel  # noqa: E402


class Killer:
    """A reward function (``sevens``) that SIGKILLs process ``pid`` on its ``at_call``-th call: after that step's
    generation, before the learners score its experience."""

    def __init__(self, at_call: int):
        self.at_call, self.calls, self.pid = at_call, 0, None

    def __call__(self, prompts, completions):
        self.calls += 1
        if self.calls == self.at_call:
            os.kill(self.pid, signal.SIGKILL)
        return sevens(prompts, completions)


def _run(tmp_path, model_dir, reward):
    return DistributedPPO(_cfg(tmp_path, steps=4, save_every=1), model_dir, PROMPTS, reward, learners=2,
                          engines=1, engine="hf", cpus=0.5)


def _all_cpus_free(timeout_s=20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU") != 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    return ray.available_resources().get("CPU") == 2


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("PPid:"))


def _ours(pid: int) -> bool:
    """Whether ``pid`` descends from this process (the local Ray cluster this test module started)."""
    while pid > 1:
        pid = _parent(pid)
        if pid == os.getpid():
            return True
    return False


def _kill_a_learner_after(marker, timeout_s=300.0) -> threading.Thread:
    """A thread that SIGKILLs one learner actor's process (found by its Ray process title among this process's
    descendants) once ``marker`` exists."""
    def watch():
        deadline = time.monotonic() + timeout_s
        while not os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if f.read().startswith(b"ray::LearnerRole") and _ours(pid):
                        os.kill(pid, signal.SIGKILL)
                        return
            except (OSError, StopIteration):
                continue
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _resume_via_cli(tmp_path, model_dir, steps: int = 4) -> int:
    """``rlhf-fast ppo ... --learners 2 --resume`` with the run's settings (a tiny reward model scores instead)."""
    tok = tokenizer()
    if not (tmp_path / "rm").exists():
        RewardModel.from_causal_lm(tiny_policy(tok, seed=1)).save_pretrained(tmp_path / "rm", tok)
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    settings = {k: v for k, v in vars(_cfg(tmp_path, steps=steps, save_every=1)).items()
                if k in ("estimator", "samples_per_prompt", "batch_size", "minibatch_size", "ppo_epochs", "lr",
                         "max_new_tokens", "steps", "kl_coef", "seed", "save_every", "out_dir")}
    argv = ["ppo", "--model", model_dir, "--reward-model", str(tmp_path / "rm"), "--prompts",
            str(tmp_path / "prompts.jsonl"), "--learners", "2", "--engines", "1", "--engine", "hf",
            "--cpus_per_actor", "0.5", "--resume"]
    for k, v in settings.items():
        argv += [f"--{k}", str(v)]
    return main(argv)


@pytest.mark.slow
def test_killed_learner_stops_the_run_and_resume_finishes_it(cluster, model_dir, tmp_path):
    killer = Killer(at_call=3)                              # dies in step 3 of 4, after step_000002 is complete
    run = _run(tmp_path, model_dir, killer)
    try:
        killer.pid = ray.get(run.learners[1].pid.remote())
        with pytest.raises(LearnerDiedError) as info:
            run.train()
    finally:
        run.close()
    err = info.value
    ckpt = os.path.join(str(tmp_path), "checkpoints", "step_000002")
    assert (err.ranks, err.step, err.checkpoint) == ([1], 3, ckpt)
    assert "learner rank 1 died during step 3" in str(err) and ckpt in str(err) and "--resume" in str(err)
    assert isinstance(err.__cause__, ray.exceptions.RayActorError)
    assert not run.learners and not run.engines and _all_cpus_free()   # no actor left, none blocked in gloo
    metrics = tmp_path / "metrics.jsonl"
    kept = metrics.read_text().splitlines()
    assert [json.loads(line)["step"] for line in kept] == [1, 2]

    os.makedirs(tmp_path / "checkpoints" / "step_000003")       # cut short: no driver.json, skipped by load
    killer = _kill_a_learner_after(tmp_path / "checkpoints" / "step_000003" / "driver.json")
    with pytest.raises(SystemExit) as stop:                      # killed under the CLI in step 4 of 6
        _resume_via_cli(tmp_path, model_dir, steps=6)
    killer.join()
    line = str(stop.value.code)
    ckpt = os.path.join(str(tmp_path), "checkpoints", "step_000003")
    assert "\n" not in line and line.startswith("error: learner rank ") and "died during step 4" in line
    assert ckpt in line and "--resume" in line and _all_cpus_free()
    assert _resume_via_cli(tmp_path, model_dir, steps=6) == 0
    lines = metrics.read_text().splitlines()
    assert lines[:2] == kept                                     # continued from step_000002, not from scratch
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert [json.loads(line)["weight_version"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert os.path.exists(tmp_path / "checkpoints" / "step_000006" / "driver.json")
