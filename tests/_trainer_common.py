"""Shared builders for the trainer tests: the sorting task's tokenizer and 1-layer Llamas (head_dim 64)."""
import pytest
import torch

from rlhf_fast.data import SortTask, build_tokenizer
from rlhf_fast.models import build_tiny_llama, tiny_llama_config

TIMING_KEYS = {"step_seconds", "time_generate", "time_score", "time_update", "time_sync", "time_online_rm"}


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


def params_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not suffer when the cores are shared); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
