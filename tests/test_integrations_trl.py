"""rlhf_fast.integrations.trl inside TRL 1.16: its fused lm_head function, its logits helpers and a whole
GRPOTrainer step give TRL's values and gradients with the integration on, rlhf_fast counted as running."""
import copy
import tempfile

import pytest
import torch

trl = pytest.importorskip("trl")
import trl.kernels  # noqa: E402
import trl.trainer.utils as trl_utils  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from rlhf_fast.integrations import _patch  # noqa: E402
from rlhf_fast.integrations import trl as fast  # noqa: E402

ORIGINAL = trl.kernels.ChunkedLogProbFunction
HELPERS = {n: getattr(trl_utils, n) for n in ("selective_log_softmax", "selective_log_softmax_and_entropy",
                                              "entropy_from_logits")}


@pytest.fixture(autouse=True)
def _off():
    fast.disable()
    fast.reset_counts()
    yield
    fast.disable()


def _tiny_llama(vocab=97, seed=0, **extra):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=1, num_key_value_heads=1, head_dim=64, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)
    return LlamaForCausalLM(cfg).float()


def _grads(*tensors):
    return [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("softcap,logit_scale,bias", [(None, 1.0, False), (5.0, 0.5, True), (None, 2.0, True)])
def test_fused_head_function_matches_trl(softcap, logit_scale, bias):
    torch.manual_seed(0)
    N, H, V = 37, 24, 301
    h0, w0 = torch.randn(N, H), torch.randn(V, H) * 0.3
    b0 = torch.randn(V) if bias else None
    y = torch.randint(0, V, (N,))
    g_lp, g_h = torch.randn(N), torch.randn(N)
    results = []
    for on in (False, True):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        b = None if b0 is None else b0.clone().requires_grad_()
        with fast.enabled() if on else torch.enable_grad():
            lp, ent, *rest = trl_utils._ChunkedLogProbFunction.apply(h, w, b, y, 0.7, 128, softcap, logit_scale,
                                                                     ("log_probs", "entropy"))
        assert rest == [None, None, None]
        ((lp * g_lp).sum() + (ent * g_h).sum()).backward()
        results.append([lp.detach(), ent.detach()] + _grads(h, w) + ([] if b is None else _grads(b)))
    for ours, theirs in zip(results[1], results[0]):
        torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=2e-5)
    assert fast.call_counts() == {"fused_lm_head": 1}


def test_add_fused_lm_head_model_values_and_grads():
    """TRL's own fused forward (add_fused_lm_head, fused_lm_head=True) over a real model: loss, log-probs,
    entropy and every parameter's gradient agree with the integration on."""
    base = _tiny_llama()
    ids = torch.randint(3, 97, (3, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    labels[2, 9:] = -100
    out = []
    for on in (False, True):
        model = copy.deepcopy(base)
        trl_utils.add_fused_lm_head(model, temperature=0.9, outputs=("log_probs", "entropy"))
        with fast.enabled() if on else torch.enable_grad():
            res = model(input_ids=ids, labels=labels, fused_lm_head=True)
            (res.loss + 0.1 * res.entropy.sum()).backward()
        out.append((res.loss.detach(), res.log_probs.detach(), res.entropy.detach(),
                    {n: p.grad for n, p in model.named_parameters()}))
    (l0, lp0, e0, g0), (l1, lp1, e1, g1) = out
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lp1, lp0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(e1, e0, rtol=1e-5, atol=1e-5)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=name)
    assert fast.call_counts() == {"fused_lm_head": 1}


def test_extra_outputs_fall_back_to_trl():
    """SFT's is_top1 / DPO's mean_logits are TRL's own: the whole call goes to TRL, counted as a fallback."""
    h, w, y = torch.randn(5, 8), torch.randn(11, 8), torch.randint(0, 11, (5,))
    with fast.enabled():
        got = trl_utils._ChunkedLogProbFunction.apply(h, w, None, y, 1.0, 64, None, 1.0, ("log_probs", "is_top1"))
    want = ORIGINAL.apply(h, w, None, y, 1.0, 64, None, 1.0, ("log_probs", "is_top1"))
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(got[4], want[4])
    assert fast.call_counts() == {"fused_lm_head_fallback": 1}


def test_logits_helpers_routed_through_compat():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 33, requires_grad=True)
    index = torch.randint(0, 33, (2, 5))
    mask = torch.rand(2, 5) > 0.3
    want_lp = HELPERS["selective_log_softmax"](logits, index, temperature=0.8, row_mask=mask)
    want_lp2, want_ent2 = HELPERS["selective_log_softmax_and_entropy"](logits, index, temperature=0.8)
    want_ent = HELPERS["entropy_from_logits"](logits)
    with fast.enabled():
        lp = trl_utils.selective_log_softmax(logits, index, temperature=0.8, row_mask=mask)
        lp2, ent2 = trl_utils.selective_log_softmax_and_entropy(logits, index, temperature=0.8)
        ent = trl_utils.entropy_from_logits(logits)
    for got, want in ((lp, want_lp), (lp2, want_lp2), (ent2, want_ent2), (ent, want_ent)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g_want = torch.autograd.grad(want_lp.sum() + want_ent.sum(), logits)[0]
    g_got = torch.autograd.grad(lp.sum() + ent.sum(), logits)[0]
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-6)
    assert fast.call_counts() == {"selective_log_softmax": 1, "selective_log_softmax_and_entropy": 1,
                                  "entropy_from_logits": 1}


def test_disable_restores_exactly():
    fast.enable()
    fast.enable()                       # idempotent
    assert isinstance(trl_utils._ChunkedLogProbFunction, fast.FusedLMHead)
    assert trl_utils.selective_log_softmax is not HELPERS["selective_log_softmax"]
    fast.disable()
    assert trl_utils._ChunkedLogProbFunction is ORIGINAL
    assert all(getattr(trl_utils, n) is f for n, f in HELPERS.items())


def test_untested_version_raises_and_patches_nothing(monkeypatch):
    monkeypatch.setattr(_patch, "installed_version", lambda dist: "1.17.0")
    with pytest.raises(RuntimeError, match=r"checked against trl.*found trl 1\.17\.0"):
        fast.enable()
    assert trl_utils._ChunkedLogProbFunction is ORIGINAL


def test_changed_private_name_raises(monkeypatch):
    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", object())
    with pytest.raises(RuntimeError, match="_ChunkedLogProbFunction"):
        fast.enable()
    assert not any(getattr(trl_utils, n) is not f for n, f in HELPERS.items())


def _grpo_step(base, tok, prompts):
    """One GRPOTrainer.train() step (SGD, so the parameter change is lr * gradient); returns the training loss,
    the sum of the policy log-probs TRL computed, and the parameters' change."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    model = copy.deepcopy(base)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="test_integrations_trl_"), per_device_train_batch_size=4,
                      gradient_accumulation_steps=1, num_generations=2, max_completion_length=6, max_steps=1,
                      learning_rate=0.5, optim="sgd", beta=0.0, num_iterations=1, use_cpu=True, report_to="none",
                      save_strategy="no", logging_strategy="no", disable_tqdm=True, bf16=False, temperature=0.7,
                      dataloader_num_workers=0, seed=0)
    reward = lambda prompts, completions, **kw: [float(len(c) % 7) for c in completions]
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tok)
    sums = []
    hook = model.register_forward_hook(
        lambda m, a, out: sums.append(out.log_probs.detach().sum()) if getattr(out, "log_probs", None) is not None
        else None)
    loss = trainer.train().training_loss
    hook.remove()
    delta = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    return loss, torch.stack(sums), delta


@pytest.mark.slow
def test_grpo_trainer_step_same_with_and_without():
    from rlhf_fast.data import SortTask, build_tokenizer
    task = SortTask()
    tok = build_tokenizer(task.corpus())
    base = _tiny_llama(vocab=len(tok))
    prompts = task.prompts(2, seed=0) * 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # a tiny model: one thread is faster, and immune to a busy machine
    try:
        loss0, sums0, delta0 = _grpo_step(base, tok, prompts)
        with fast.enabled():
            loss1, sums1, delta1 = _grpo_step(base, tok, prompts)
    finally:
        torch.set_num_threads(threads)
    assert fast.call_counts().get("fused_lm_head", 0) >= 1
    assert abs(loss1 - loss0) <= 1e-5 * max(1.0, abs(loss0))
    torch.testing.assert_close(sums1, sums0, rtol=1e-5, atol=1e-4)
    moved = max(d.abs().max().item() for d in delta0.values())
    assert moved > 1e-4                                  # the step changed the parameters
    for name in delta0:
        torch.testing.assert_close(delta1[name], delta0[name], rtol=1e-3, atol=1e-6 * max(moved, 1.0), msg=name)
