"""Shared builders for the trainer tests: the sorting task's tokenizer and 1-layer Llamas (head_dim 64); a real
SIGKILL of a run once it has written a file."""
import signal
import subprocess
import time

import pytest
import torch

from rlhf_fast.data import SortTask, build_tokenizer
from rlhf_fast.models import build_tiny_llama, tiny_llama_config

TIMING_KEYS = {"step_seconds", "time_generate", "time_score", "time_update", "time_sync", "time_online_rm"}


def sigkill_when(proc: subprocess.Popen, path, timeout_s: float = 300.0) -> None:
    """SIGKILL ``proc`` as soon as ``path`` exists (or it exits, or ``timeout_s`` passes) and assert it died of it."""
    deadline = time.time() + timeout_s
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]


def tokenizer():
    return build_tokenizer(SortTask().corpus())


def tiny_policy(tok, seed=0, hidden=64, layers=1):
    return build_tiny_llama(tiny_llama_config(len(tok), hidden, layers, 2 * hidden, max_position_embeddings=24),
                            seed=seed)


def sevens(prompts, completions):
    """A simple learnable reward: the share of "7" tokens among 4 completion slots."""
    return [c.split().count("7") / 4 for c in completions]


def strip_timings(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def assert_same_update(a: tuple, b: tuple, atol: float = 1e-4) -> None:
    """Two updates' ``(params, grads, stats)`` agree: the last minibatch's gradients to fp32 rounding, the
    parameters to ``atol`` (Adam turns the rounding of near-zero gradients into ~1e-3..1e-2 of a step at lr 1e-2),
    the stats to 1e-4 relative."""
    (p1, g1, s1), (p0, g0, s0) = a, b
    assert len(g1) == len(g0) > 0
    for x, y in zip(g1, g0):
        assert (x - y).abs().max() <= 1e-4 * y.abs().max() + 1e-9
    for x, y in zip(p1, p0):
        torch.testing.assert_close(x, y, rtol=0, atol=atol)
    assert s1.keys() == s0.keys()
    for key in s0:
        assert s1[key] == pytest.approx(s0[key], rel=1e-4, abs=1e-6), key


def params_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not suffer when the cores are shared); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
