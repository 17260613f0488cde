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


@pytest.mark.parametrize("outputs", [("log_probs", "entropy"),
                                     ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")])
def test_add_fused_lm_head_model_values_and_grads(outputs):
    """TRL's own fused forward (add_fused_lm_head, fused_lm_head=True) over a real model, with GRPO's and with
    DPO's output sets: loss, every requested output and every parameter's gradient agree with the integration on."""
    base = _tiny_llama()
    ids = torch.randint(3, 97, (3, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    labels[2, 9:] = -100
    fields = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    out = []
    for on in (False, True):
        model = copy.deepcopy(base)
        trl_utils.add_fused_lm_head(model, temperature=0.9, outputs=outputs)
        with fast.enabled() if on else torch.enable_grad():
            res = model(input_ids=ids, labels=labels, fused_lm_head=True)
            (res.loss + 0.1 * res.entropy.sum()).backward()
        out.append((res.loss.detach(), {f: getattr(res, f) for f in fields},
                    {n: p.grad for n, p in model.named_parameters()}))
    (l0, o0, g0), (l1, o1, g1) = out
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    for f in fields:
        assert (o1[f] is None) == (o0[f] is None) == (f not in outputs), f
        if o0[f] is not None:
            torch.testing.assert_close(o1[f].detach(), o0[f].detach(), rtol=1e-5, atol=1e-5, msg=f)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=name)
    metrics = {"fused_lm_head_metrics": 1} if len(outputs) > 2 else {}
    assert fast.call_counts() == {"fused_lm_head": 1, **metrics}


# The output sets TRL 1.16's trainers request: GRPO/RLOO, DPO (+ WPO's log_sum_sq_probs), SFT, KTO.
OUTPUT_SETS = [("log_probs", "entropy"), ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs"),
               ("log_probs", "entropy", "is_top1"), ("log_probs", "entropy", "mean_logits")]


@pytest.mark.parametrize("outputs", OUTPUT_SETS)
@pytest.mark.parametrize("softcap,logit_scale,bias", [(None, 1.0, False), (5.0, 0.5, True), (None, 2.0, True)])
def test_fused_head_function_matches_trl(outputs, softcap, logit_scale, bias):
    """TRL's fused lm_head function with the integration on: log-probs, entropy and their gradients, and DPO's /
    SFT's / KTO's metric outputs (mean logit, top-1 hit, log sum p^2) equal TRL's; half the targets are the
    argmax, so is_top1 is neither all False nor all True."""
    torch.manual_seed(2)
    N, H, V = 41, 16, 523
    h0, w0 = torch.randn(N, H), torch.randn(V, H) * 0.3
    b0 = torch.randn(V) if bias else None
    y = torch.randint(0, V, (N,))
    z = logit_scale * (h0 @ w0.t() + (0 if b0 is None else b0))
    y[::2] = z.argmax(-1)[::2]
    g_lp, g_h = torch.randn(N), torch.randn(N)
    results = []
    for on in (False, True):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        b = None if b0 is None else b0.clone().requires_grad_()
        with fast.enabled() if on else torch.enable_grad():
            got = trl_utils._ChunkedLogProbFunction.apply(h, w, b, y, 0.8, 128, softcap, logit_scale, outputs)
        ((got[0] * g_lp).sum() + (got[1] * g_h).sum()).backward()
        results.append(([x.detach() if x is not None else None for x in got],
                        _grads(h, w) + ([] if b is None else _grads(b))))
    (ours, ours_g), (theirs, theirs_g) = results[1], results[0]
    for name, a, b_ in zip(trl.kernels.chunked_logprob.OPTIONAL_OUTPUTS, ours[1:], theirs[1:]):
        assert (a is None) == (name not in outputs), name
        if a is not None and a.dtype == torch.bool:
            assert torch.equal(a, b_) and a.any() and not a.all(), name
        elif a is not None:
            torch.testing.assert_close(a, b_, rtol=2e-5, atol=2e-5, msg=name)
    torch.testing.assert_close(ours[0], theirs[0], rtol=2e-5, atol=2e-5)
    for a, b_ in zip(ours_g, theirs_g):
        torch.testing.assert_close(a, b_, rtol=2e-5, atol=2e-5)
    assert fast.call_counts() == {"fused_lm_head": 1, **({"fused_lm_head_metrics": 1} if len(outputs) > 2 else {})}


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


def test_cpu_head_gets_only_labelled_rows(monkeypatch):
    """On CPU TRL's fused forward hands every position to the head; with the integration only the labelled
    rows (TRL's own compact path), while TRL's kernel module keeps its own switch; disable restores both."""
    kernel_switch = trl.kernels.chunked_logprob._use_triton
    rows = []
    real = fast.linear_logprobs
    monkeypatch.setattr(fast, "linear_logprobs", lambda hidden, *a, **k: rows.append(hidden.shape[0]) or
                        real(hidden, *a, **k))
    model = _tiny_llama()
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    ids = torch.randint(3, 97, (3, 12))
    labels = ids.clone()
    labels[:, :5] = -100
    labels[1, 8:] = -100
    with fast.enabled():
        assert trl_utils._use_triton(torch.device("cpu"))
        assert trl.kernels.chunked_logprob._use_triton is kernel_switch
        model(input_ids=ids, labels=labels, fused_lm_head=True).loss.backward()
    assert rows == [int((labels[:, 1:] != -100).sum())] == [7 + 3 + 7]
    assert trl_utils._use_triton is kernel_switch and not trl_utils._use_triton(torch.device("cpu"))


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


def _grpo_step(base, tok, prompts, beta, num_iterations):
    """One GRPOTrainer.train() step (SGD, so the parameter change is lr * gradient); returns the training loss,
    the sum of the policy log-probs TRL computed, and the parameters' change. ``beta > 0`` adds the reference
    model's log-probs, ``num_iterations > 1`` the old policy's (both through the fused lm_head)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    model = copy.deepcopy(base)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="test_integrations_trl_"), per_device_train_batch_size=4,
                      gradient_accumulation_steps=1, num_generations=2, max_completion_length=6, max_steps=1,
                      learning_rate=0.5, optim="sgd", beta=beta, num_iterations=num_iterations, use_cpu=True, report_to="none",
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
@pytest.mark.parametrize("beta,num_iterations,calls", [(0.0, 1, 1), (0.05, 2, 3)])
def test_grpo_trainer_step_same_with_and_without(beta, num_iterations, calls, tmp_path):
    """Every log-prob of the step runs on rlhf_fast: the policy's (forward and backward), and with beta > 0 and
    num_iterations > 1 also the reference model's and the old policy's, ``calls`` fused lm_head calls in all."""
    from rlhf_fast.data import SortTask, build_tokenizer
    task = SortTask()
    tok = build_tokenizer(task.corpus())
    base = _tiny_llama(vocab=len(tok))
    base.save_pretrained(tmp_path)                        # safetensors; TRL builds the reference model from it
    base.config._name_or_path = str(tmp_path)
    prompts = task.prompts(2, seed=0) * 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # a tiny model: one thread is faster, and immune to a busy machine
    try:
        loss0, sums0, delta0 = _grpo_step(base, tok, prompts, beta, num_iterations)
        with fast.enabled():
            loss1, sums1, delta1 = _grpo_step(base, tok, prompts, beta, num_iterations)
    finally:
        torch.set_num_threads(threads)
    assert fast.call_counts() == {"fused_lm_head": calls}     # nothing left on TRL's kernel
    assert abs(loss1 - loss0) <= 1e-5 * max(1.0, abs(loss0))
    torch.testing.assert_close(sums1, sums0, rtol=1e-5, atol=1e-4)
    moved = max(d.abs().max().item() for d in delta0.values())
    assert moved > 1e-4                                  # the step changed the parameters
    for name in delta0:
        torch.testing.assert_close(delta1[name], delta0[name], rtol=1e-3, atol=1e-6 * max(moved, 1.0), msg=name)
