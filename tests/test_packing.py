"""Padding-free (packed) decoder forward: the real tokens of a padded batch as one sequence give the padded
forward's hidden states, log-probs, gradients and PPO update (every packable family, sdpa and eager), only the real
tokens go through the decoder, and a family without an exact packed form is refused by name."""
import copy
import dataclasses

import pytest
import torch

from _trainer_common import assert_same_update, one_thread  # noqa: F401
from test_algos_grad_accum import SETUPS, _batch, _tokenizer, _trainer
from rlhf_fast.models.packing import PACKABLE_MODEL_TYPES, packed_forward, resolve_packing, supports_packing
from rlhf_fast.models.policy_logprobs import _decoder, decoder_hidden, policy_logprobs
from rlhf_fast.models.tiny import ARCHITECTURES, TIE_CHOICES, build_tiny, tiny_config

VOCAB = 300


def _model(arch: str, attn: str = "sdpa"):
    config = tiny_config(arch, VOCAB, tie_word_embeddings=TIE_CHOICES[arch][0], max_position_embeddings=64)
    config._attn_implementation = attn
    return build_tiny(config, seed=0).eval()


def _padded_batch(B: int = 5, L: int = 12):
    """Left-padded, right-padded, both, a 1-token row and a full row."""
    ids = torch.randint(3, VOCAB, (B, L), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, :3] = False
    mask[1, 9:] = False
    mask[2, :5] = False
    mask[2, 10:] = False
    mask[3, :11] = False
    return ids, mask


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_packed_hidden_states_are_the_padded_ones(arch, attn):
    model = _model(arch, attn)
    ids, mask = _padded_batch()
    with torch.no_grad():
        padded = decoder_hidden(model, ids, mask)
        packed = decoder_hidden(model, ids, mask, pack=True)
        raw = packed_forward(_decoder(model), ids, mask)
    err = (padded - packed)[mask].abs().max().item()
    assert err <= 1e-5, f"{arch}/{attn}: packed vs padded {err:.2e}"
    assert supports_packing(model) == (arch in PACKABLE_MODEL_TYPES)
    raw_err = (padded - raw)[mask].abs().max().item()
    if arch in PACKABLE_MODEL_TYPES:
        assert raw_err <= 1e-5 and bool((packed[~mask] == 0).all())
    else:   # why the family is excluded: its packed forward attends across rows (decoder_hidden fell back)
        assert raw_err > 1e-2


def test_packed_logprobs_and_gradients_are_the_padded_ones():
    model = _model("llama").train()
    ids, mask = _padded_batch()
    response = mask.clone()
    response[:, :6] = False
    response[:, 1:] &= mask[:, :-1]          # a scored token follows a real one (its state is the prediction)
    out = {}
    for pack in (False, True):
        model.zero_grad()
        logp, ent = policy_logprobs(model, ids, mask, response, temperature=0.7, return_entropy=True, pack=pack)
        (logp.sum() + 0.1 * ent.sum()).backward()
        out[pack] = (logp.detach(), ent.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[True][1], out[False][1], atol=1e-5, rtol=0)
    for a, b in zip(out[True][2], out[False][2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_only_the_real_tokens_reach_the_decoder():
    model = _model("qwen3")
    ids, mask = _padded_batch()
    seen = []
    hook = _decoder(model).register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape),
                                                     with_kwargs=True)
    with torch.no_grad():
        decoder_hidden(model, ids, mask, pack=True)
    hook.remove()
    assert seen == [torch.Size([1, int(mask.sum())])]


def test_resolve_packing():
    llama, opt = _model("llama"), _model("opt")
    assert resolve_packing("on", llama) and not resolve_packing("off", llama)
    assert not resolve_packing("auto", llama)             # sdpa: an n x n mask, packing pays only for heavy padding
    llama.config._attn_implementation = "flash_attention_2"
    assert resolve_packing("auto", llama)                 # varlen kernels: packing always pays
    assert not resolve_packing("auto", opt) and not resolve_packing("off", opt)
    with pytest.raises(ValueError, match=r"pack_sequences=on: model type 'opt'.*no exact packed form"):
        resolve_packing("on", opt)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("setup", SETUPS)
def test_packed_update_is_the_padded_one(setup, fused):
    """Scoring and the update (grad_accum 4, length-grouped) with the decoder packed: the same experience and
    parameters as padded, for a separate critic, a value head and GRPO."""
    tok = _tokenizer()
    base = _trainer(tok, grad_accum=4, **SETUPS[setup])
    assert not base.pack                                     # auto on sdpa: off
    batch = _batch(tok)
    scores = torch.randn(len(batch), generator=torch.Generator().manual_seed(1))
    runs = []
    for pack in (True, False):
        t = copy.deepcopy(base)
        t.config = dataclasses.replace(t.config, pack_sequences="on" if pack else "off")
        t.pack, t.fused_objective = pack, fused
        rows = []
        hook = _decoder(t.policy).register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[0]),
                                                            with_kwargs=True)
        exp, _ = t.make_experience(batch, scores)
        stats = t.update(exp, 0)
        hook.remove()
        assert rows and all((r == 1) == pack for r in rows)   # packed: every policy forward is one sequence
        models = [t.policy] + ([t.critic] if t.critic is not None and t.critic is not t.policy else [])
        params = [p for m in models for p in m.parameters()]
        runs.append((exp, ([p.detach().clone() for p in params], [p.grad.clone() for p in params
                                                                  if p.grad is not None], stats)))
    mask = runs[1][0].mask
    for name in ("old_logp", "values", "advantages", "returns"):   # padding's values differ: never used
        a, b = getattr(runs[0][0], name), getattr(runs[1][0], name)
        if a is not None:
            torch.testing.assert_close(a[mask], b[mask], atol=1e-5, rtol=1e-4, msg=name)
    assert_same_update(runs[0][1], runs[1][1], atol=5e-4)


SFT_RECORDS = [{"prompt": "3 1 2 :", "completion": "1 2 3"}, {"prompt": "9 :", "completion": "9"},
               {"prompt": "5 4 8 7 6 2 :", "completion": "2 4 5 6 7 8"}, {"prompt": "1 1 :", "completion": "1 1"}]


def _grads(model):
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_sft_and_dpo_pack_to_the_same_loss_and_gradients():
    """``pack_sequences`` in ``rlhf-fast sft`` and ``dpo``: the packed SFT loss / DPO sequence log-probs and their
    gradients are the padded ones (left-padded prompts, right-padded completions of several lengths)."""
    from rlhf_fast.data.collators import collate_comparisons, collate_sft
    from rlhf_fast.trainer.config import SFTConfig
    from rlhf_fast.trainer.dpo import DPOTrainer, sequence_logps
    from rlhf_fast.trainer.dpo_config import DPOConfig
    from rlhf_fast.trainer.sft import SFTTrainer
    from _trainer_common import tiny_policy, tokenizer
    tok = tokenizer()
    sft, dpo = {}, {}
    pairs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": SFT_RECORDS[-1 - i]["completion"]}
             for i, r in enumerate(SFT_RECORDS)]
    for pack in ("on", "off"):
        model = tiny_policy(tok, seed=2, layers=2)
        trainer = SFTTrainer(SFTConfig(pack_sequences=pack), model, tok, SFT_RECORDS)
        assert trainer.pack == (pack == "on")
        loss = trainer.loss(collate_sft(SFT_RECORDS, tok))
        loss.backward()
        sft[pack] = (loss.detach(), _grads(model))
        model.zero_grad()
        assert DPOTrainer(DPOConfig(pack_sequences=pack), model, tok, pairs).pack == (pack == "on")
        logps, lengths = sequence_logps(model, collate_comparisons(pairs, tok), pack == "on")
        logps.sum().backward()
        dpo[pack] = (logps.detach(), _grads(model))
    for got, want in ((sft["on"], sft["off"]), (dpo["on"], dpo["off"])):
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
        assert len(got[1]) == len(want[1]) > 0
        for a, b in zip(got[1], want[1]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
