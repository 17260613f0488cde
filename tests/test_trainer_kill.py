"""Kill-and-resume for real: the `rlhf-fast ppo` CLI in a subprocess is SIGKILLed mid-run after its first
checkpoint, then rerun with --resume. Verified against an uninterrupted run with the same seed: one record per
step (nothing lost, nothing duplicated), the same sampled completions (identical scores and lengths every step),
and the same metrics and final weights up to float re-association (rel. 1e-4): two *processes* may differ in
the last bits of a matmul (MKL picks kernels by buffer alignment; MKL_CBWR=COMPATIBLE is set to limit that),
while resuming within one process is bit-exact (test_trainer_ppo.py::test_ppo_resume_is_exact)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from _trainer_common import sigkill_when, strip_timings, tiny_policy, tokenizer
from rlhf_fast.data import SortTask, write_jsonl
from rlhf_fast.models import RewardModel, save_model

pytestmark = pytest.mark.slow
STEPS = 10


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    tok = tokenizer()
    save_model(tiny_policy(tok), tok, root / "policy")
    RewardModel.from_causal_lm(tiny_policy(tok, seed=1)).save_pretrained(root / "rm", tok)
    write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in SortTask().prompts(64, seed=0)])
    return root


def _cmd(assets, out_dir, resume=False):
    cmd = [sys.executable, "-m", "rlhf_fast", "ppo", "--model", str(assets / "policy"),
           "--reward-model", str(assets / "rm"), "--prompts", str(assets / "prompts.jsonl"),
           "--out-dir", str(out_dir), "--steps", str(STEPS), "--save_every", "2", "--engine", "hf",
           "--batch_size", "8", "--samples_per_prompt", "2", "--max_new_tokens", "4", "--minibatch_size", "8",
           "--kl_target", "0.5", "--progress", "false"]
    return cmd + (["--resume"] if resume else [])


def _env():
    path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_CBWR": "COMPATIBLE", "PYTHONPATH": path}


def _metrics(out_dir):
    with open(out_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_sigkill_mid_run_then_resume_equals_uninterrupted(assets, tmp_path):
    straight = tmp_path / "straight"
    subprocess.run(_cmd(assets, straight), env=_env(), check=True, capture_output=True, timeout=300)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(assets, killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sigkill_when(proc, killed / "checkpoints" / "step_000002", timeout_s=240)
    done = sorted(os.listdir(killed / "checkpoints"))
    assert f"step_{STEPS:06d}" not in done, "the run finished before it could be killed"

    res = subprocess.run(_cmd(assets, killed, resume=True), env=_env(), capture_output=True, timeout=300)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    a, b = _metrics(straight), _metrics(killed)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(strip_timings(a), strip_timings(b)):
        assert ra.keys() == rb.keys()
        for key in ("score", "true_score", "response_length", "tokens"):
            assert ra.get(key) == rb.get(key), (ra["step"], key)
        for key, value in ra.items():
            assert rb[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (ra["step"], key)
    wa = load_file(straight / "policy" / "model.safetensors")
    wb = load_file(killed / "policy" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6) for k in wa)
