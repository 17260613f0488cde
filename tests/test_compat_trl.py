"""rlhf_fast.compat.trl against TRL 1.16's own trl.trainer.utils (installed in the venv), and masked_whiten
against a reimplementation of TRL 1.10's (trl/experimental/ppo/ppo_trainer.py; TRL 1.15+ no longer ships it).

Tolerances: fp32 logits: both sides compute in fp32, the log-normaliser summed in a different order: 1e-5.
bf16 logits: we accumulate in fp32, TRL's CPU path computes log_softmax in bf16 (error ~1e-2), so the
reference is TRL on the exact fp32 upcast of the same bf16 values, at the fp32 tolerance.
"""
import pytest
import torch

from rlhf_fast.compat import trl as ours

trl_utils = pytest.importorskip("trl.trainer.utils")

B, T, V = 3, 5, 37
TOL = dict(rtol=1e-5, atol=1e-5)


def _logits(dtype=torch.float32, shape=(B, T, V)):
    return (torch.randn(shape) * 4).to(dtype)


def _pair(x):
    return x.clone().requires_grad_(), x.float().clone().requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("row_mask", [False, True])
def test_selective_log_softmax(dtype, temperature, row_mask):
    logits, index = _logits(dtype), torch.randint(0, V, (B, T))
    rmask = (torch.rand(B, T) > 0.3).long() if row_mask else None
    mine, theirs = _pair(logits)
    out = ours.selective_log_softmax(mine, index, temperature, rmask)
    ref = trl_utils.selective_log_softmax(theirs, index, temperature, rmask)
    assert out.shape == ref.shape == (B, T) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, **TOL)
    g = torch.randn(B, T)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(mine.grad.float(), theirs.grad, rtol=1e-5, atol=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("row_mask", [False, True])
def test_selective_log_softmax_top_k(row_mask):
    logits, index = _logits(), torch.randint(0, V, (B, T, 4))
    rmask = (torch.rand(B, T, 4) > 0.3) if row_mask else None
    mine, theirs = _pair(logits)
    out = ours.selective_log_softmax(mine, index, 0.8, rmask)
    ref = trl_utils.selective_log_softmax(theirs, index, 0.8, rmask)
    assert out.shape == ref.shape == (B, T, 4)
    torch.testing.assert_close(out, ref, **TOL)
    g = torch.randn(B, T, 4)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(mine.grad, theirs.grad, **TOL)


@pytest.mark.parametrize("shape", [(B, T, V), (B * T, V)], ids=["3d", "2d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_from_logits(shape, dtype):
    mine, theirs = _pair(_logits(dtype, shape))
    out = ours.entropy_from_logits(mine, chunk_size=4)
    ref = trl_utils.entropy_from_logits(theirs, chunk_size=4)
    assert out.shape == ref.shape == shape[:-1]
    torch.testing.assert_close(out, ref, **TOL)
    g = torch.randn(shape[:-1])
    (out * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(mine.grad.float(), theirs.grad, rtol=1e-5, atol=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("entropy_requires_grad", [True, False])
def test_selective_log_softmax_and_entropy(entropy_requires_grad):
    logits, index, rmask = _logits(), torch.randint(0, V, (B, T)), torch.rand(B, T) > 0.3
    mine, theirs = _pair(logits)
    out = ours.selective_log_softmax_and_entropy(mine, index, entropy_requires_grad, 0.9, rmask)
    ref = trl_utils.selective_log_softmax_and_entropy(theirs, index, entropy_requires_grad, 0.9, rmask)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, **TOL)
    assert out[1].requires_grad == ref[1].requires_grad == entropy_requires_grad
    loss_terms = [(out[0], ref[0])] + ([(out[1], ref[1])] if entropy_requires_grad else [])
    g = torch.randn(B, T)
    sum((a * g).sum() for a, _ in loss_terms).backward()
    sum((b * g).sum() for _, b in loss_terms).backward()
    torch.testing.assert_close(mine.grad, theirs.grad, **TOL)


def test_temperature_must_be_positive():
    with pytest.raises(ValueError, match="temperature"):
        ours.selective_log_softmax(_logits(), torch.zeros(B, T, dtype=torch.long), temperature=0.0)


@pytest.mark.parametrize("k", [None, 3])
def test_selective_log_softmax_compiles_fullgraph(k):
    """As TRL's own test: ``torch.compile(selective_log_softmax, fullgraph=True)`` (no graph break from the
    label check, whose data-dependent branch is skipped while compiling) matches eager, values and grads.
    aot_eager traces through dynamo and AOTAutograd without Inductor's C++ build, to keep it fast."""
    torch._dynamo.reset()
    logits = _logits()
    index = torch.randint(0, V, (B, T) if k is None else (B, T, k))
    compiled = torch.compile(ours.selective_log_softmax, fullgraph=True, backend="aot_eager")
    mine, eager = _pair(logits)
    out = compiled(mine, index, 0.7)
    ref = ours.selective_log_softmax(eager, index, 0.7)
    torch.testing.assert_close(out, ref, **TOL)
    g = torch.randn(out.shape)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(mine.grad, eager.grad, **TOL)


def test_out_of_range_labels_raise_on_cpu_and_give_nan_when_compiled():
    """Eager CPU: a ValueError naming the labels. Compiled (and on CUDA: no device sync): NaN at that row only."""
    torch._dynamo.reset()
    logits, index = _logits(), torch.randint(0, V, (B, T))
    index[1, 2] = V
    with pytest.raises(ValueError, match="labels"):
        ours.selective_log_softmax(logits, index)
    out = torch.compile(ours.selective_log_softmax, fullgraph=True, backend="aot_eager")(logits, index)
    assert torch.isnan(out[1, 2]) and torch.isfinite(out.flatten()[torch.arange(B * T) != 1 * T + 2]).all()


def _trl_1_10_masked_whiten(values, mask, shift_mean=True):
    """TRL 1.10 trl/experimental/ppo/ppo_trainer.py masked_mean / masked_var / masked_whiten, inlined."""
    def masked_mean(v, m):
        return (v * m).sum() / m.sum()
    mean = masked_mean(values, mask)
    n = mask.sum()
    var = masked_mean((values - mean) ** 2, mask) * (n / (n - 1))
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened + mean if not shift_mean else whitened


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten(shift_mean):
    values, mask = torch.randn(4, 9) * 2 + 3, (torch.rand(4, 9) > 0.4).float()
    mine, theirs = _pair(values)
    out = ours.masked_whiten(mine, mask, shift_mean)
    ref = _trl_1_10_masked_whiten(theirs, mask, shift_mean)
    torch.testing.assert_close(out, ref, **TOL)                 # masked positions included
    g = torch.randn(4, 9)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(mine.grad, theirs.grad, **TOL)
