"""DPOTrainer: first step against TRL 1.16's DPOTrainer, the fused lm_head path, the reference cache,
micro-batching, LoRA reference = base without a second copy, resume, and the ``rlhf-fast dpo`` command."""
import copy
import random

import pytest
import torch

from rlhf_fast.data import SortTask, collate_comparisons, write_jsonl
from rlhf_fast.models import save_model
from rlhf_fast.trainer.dpo_config import DPOConfig, LoraSection
from rlhf_fast.trainer.dpo import DPOTrainer, preference_pairs, sequence_logps
from _trainer_common import one_thread, strip_timings, tiny_policy, tokenizer  # noqa: F401


def pairs(n=8, seed=0):
    task, rng = SortTask(), random.Random(seed)
    out = []
    for p in task.prompts(n, seed=seed):
        d = task.digits(p)
        shuffled = d[:]
        rng.shuffle(shuffled)
        out.append({"prompt": p, "chosen": " ".join(sorted(d)), "rejected": " ".join(shuffled[::-1]) + " 0"})
    return out


def config(tmp_path, **kw):
    base = dict(out_dir=str(tmp_path), lr=1e-3, batch_size=8, max_steps=2, progress=False, max_grad_norm=1e9)
    return DPOConfig(**{**base, **kw})


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_first_step_matches_trl(tmp_path, loss_type):
    """Same model, reference, batch and beta: TRL's loss value and gradient (fp32 tolerance)."""
    from datasets import Dataset
    from trl import DPOConfig as TRLConfig, DPOTrainer as TRLTrainer
    tok, recs = tokenizer(), pairs(8)
    policy, ref = tiny_policy(tok, seed=0), tiny_policy(tok, seed=1)
    ours = DPOTrainer(config(tmp_path / "ours", loss_type=loss_type, beta=0.2), copy.deepcopy(policy), tok, recs,
                      ref_model=ref)
    rec = ours.train_step(0)
    g_ours = torch.cat([p.grad.flatten() for p in ours.model.parameters()])

    args = TRLConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=8, beta=0.2,
                     loss_type=[loss_type], max_length=None, use_cpu=True, report_to="none", bf16=False,
                     save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    # TRL concatenates prompt + completion text and appends <eos>; ours tokenizes them apart and appends <eos>
    trl_recs = [{"prompt": r["prompt"], "chosen": " " + r["chosen"], "rejected": " " + r["rejected"]} for r in recs]
    trl = TRLTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=args,
                     train_dataset=Dataset.from_list(trl_recs), processing_class=tok)
    batch = next(iter(trl.get_train_dataloader()))
    trl.model.train()
    loss = trl.compute_loss(trl.model, batch)
    loss.backward()
    g_trl = torch.cat([p.grad.flatten() for p in trl.model.parameters()])

    assert abs(rec["loss"] - loss.item()) < 1e-5 * max(1.0, abs(loss.item()))
    assert abs(rec["loss"] - 0.6931) > 1e-3 or loss_type != "sigmoid"     # a distinct reference: not log 2
    cos = torch.nn.functional.cosine_similarity(g_ours, g_trl, dim=0)
    assert cos > 1 - 1e-5 and torch.allclose(g_ours.norm(), g_trl.norm(), rtol=1e-4)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert abs(rec[k] - trl._metrics["train"][k][-1]) < 1e-4, k


def test_fused_head_reference_cache_and_micro_batches(tmp_path):
    tok, recs = tokenizer(), pairs(8)
    model = tiny_policy(tok)
    head_calls = []
    model.lm_head.register_forward_hook(lambda *a: head_calls.append(1))   # the [tokens, vocab] logits path
    full = DPOTrainer(config(tmp_path / "a"), copy.deepcopy(model), tok, recs)
    full.model.lm_head.register_forward_hook(lambda *a: head_calls.append(1))
    full.train_step(0)
    assert not head_calls
    ref = full.ref_logps
    assert ref.shape == (8, 2)
    with torch.no_grad():
        expected = sequence_logps(model, collate_comparisons(recs, tok))[0]
    torch.testing.assert_close(ref.flatten(), expected)                     # reference = the policy before step 1
    g_full = [p.grad.clone() for p in full.model.parameters()]
    micro = DPOTrainer(config(tmp_path / "b", micro_batch_size=3), copy.deepcopy(model), tok, recs)
    micro.train_step(0)
    for a, p in zip(g_full, micro.model.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=1e-4, atol=1e-6)
    simpo = DPOTrainer(config(tmp_path / "c", loss_type="simpo", beta=2.0), copy.deepcopy(model), tok, recs)
    simpo.train_step(0)
    assert simpo.ref_logps is None


def test_learns_and_resumes_exactly(tmp_path):
    tok, recs = tokenizer(), pairs(16)
    cfg = config(tmp_path / "a", max_steps=6, batch_size=8, save_every=3, lr=3e-3)
    straight = DPOTrainer(cfg, tiny_policy(tok), tok, recs).train()
    assert straight[-1]["rewards/margins"] > straight[0]["rewards/margins"]
    assert straight[-1]["rewards/accuracies"] >= 0.75
    part = DPOTrainer(config(tmp_path / "b", max_steps=3, batch_size=8, save_every=3, lr=3e-3), tiny_policy(tok),
                      tok, recs)
    part.train()
    resumed = DPOTrainer(config(tmp_path / "b", max_steps=6, batch_size=8, save_every=3, lr=3e-3),
                         tiny_policy(tok, seed=5), tok, recs)
    records = resumed.train(resume=True)
    assert [r["step"] for r in records[-3:]] == [4, 5, 6]
    for a, b in zip(strip_timings(records[-3:]), strip_timings(straight[-3:])):
        assert a == pytest.approx(b, rel=1e-5)


def test_lora_reference_is_the_base_without_a_copy(tmp_path):
    pytest.importorskip("peft")
    from rlhf_fast.models.lora import maybe_lora
    tok, recs = tokenizer(), pairs(8)
    base = tiny_policy(tok)
    expected = DPOTrainer(config(tmp_path / "a"), copy.deepcopy(base), tok, recs).compute_reference()
    model = maybe_lora(copy.deepcopy(base), LoraSection(rank=4))
    n_before = sum(p.numel() for p in model.parameters())
    trainer = DPOTrainer(config(tmp_path / "b", max_steps=3, lr=1e-2), model, tok, recs)
    trainer.train()
    torch.testing.assert_close(trainer.ref_logps, expected)
    assert sum(p.numel() for p in model.parameters()) == n_before          # no reference copy was made
    torch.testing.assert_close(trainer.compute_reference(), expected)      # adapter disabled = base, after training
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_cli_dpo(tmp_path, lora_rank):
    if lora_rank:
        pytest.importorskip("peft")
    from rlhf_fast.cli import main
    from transformers import AutoModelForCausalLM
    tok = tokenizer()
    save_model(tiny_policy(tok), tok, tmp_path / "sft")
    write_jsonl(tmp_path / "c.jsonl", pairs(8) + [{"prompt": "1 2 :", "completions": ["1 2", "2 1", "1"],
                                                   "best": 0}])
    rc = main(["dpo", "--model", str(tmp_path / "sft"), "--comparisons", str(tmp_path / "c.jsonl"),
               "--out-dir", str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "5",
               "--lora-rank", str(lora_rank), "--lr", "1e-2", "--progress", "false"])
    assert rc == 0
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert not any("lora" in k for k in out.state_dict())                   # adapter merged into the saved model
    assert len(preference_pairs([{"prompt": "p", "completions": ["a", "b", "c"], "best": 1}])) == 2
    assert main(["dpo", "--model", str(tmp_path / "sft"), "--comparisons", str(tmp_path / "c.jsonl"),
                 "--loss-type", "kto"]) == 2
