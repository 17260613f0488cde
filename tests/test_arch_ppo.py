"""``rlhf-fast ppo`` with a vLLM engine on non-Llama architectures, tied embeddings included.

Two PPO iterations each (the second one's rollouts come from weights synced after the first update): the
run must start (GPT-2's config has no ``num_attention_heads``: the KV cache is sized through
``model_geometry``) and the engine-vs-learner mismatch must stay at fp32 rounding level (<= 1e-5 nats), where a
stale tied head read ~1 nat.
"""
import json

import pytest

from _rollout_helpers import HAS_VLLM
from _trainer_common import tiny_policy, tokenizer
from rlhf_fast.cli import main
from rlhf_fast.data import SortTask, write_jsonl
from rlhf_fast.models import RewardModel, save_model
from rlhf_fast.models.tiny import build_tiny, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.skipif(not HAS_VLLM, reason="vllm not importable")]


@pytest.fixture(scope="module")
def shared_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("arch_ppo")
    tok = tokenizer()
    RewardModel.from_causal_lm(tiny_policy(tok, seed=1)).save_pretrained(root / "rm", tok)
    write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in SortTask().prompts(16, seed=0)])
    return root, tok


@pytest.mark.parametrize("arch", ["qwen3", "opt", "gpt2", "llama", "qwen2", "mistral", "phi3", "gemma2"])
def test_ppo_tied_architecture_mismatch_at_rounding(arch, shared_assets, tmp_path):
    root, tok = shared_assets
    cfg = tiny_config(arch, len(tok), tie_word_embeddings=True, max_position_embeddings=64,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    save_model(build_tiny(cfg, seed=0), tok, tmp_path / "policy")
    out = tmp_path / "run"
    code = main(["ppo", "--model", str(tmp_path / "policy"), "--reward-model", str(root / "rm"),
                 "--prompts", str(root / "prompts.jsonl"), "--out-dir", str(out), "--engine", "vllm",
                 "--steps", "2", "--batch_size", "4", "--samples_per_prompt", "2", "--max_new_tokens", "6",
                 "--minibatch_size", "8", "--ppo_epochs", "1", "--lr", "1e-3", "--progress", "false"])
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    worst = max(r["mismatch_abs_diff_max"] for r in records)
    assert worst <= 1e-5, f"{arch}: engine vs learner max |Δ| {worst:.3g} nats"
