"""logprobs_from_logits and its building blocks, every backend, against a float64 log_softmax reference.

Tolerances: bf16/fp16 logits are upcast exactly, so the reference runs on the very same values in float64 and
every dtype gets the fp32-accumulation tolerance on log-prob and entropy (ATOL_FP32: ~1e-7 relative per term
over V <= 152k terms, on values of magnitude <= ~12). Gradients are written in the logits dtype: fp32 grads
within GRAD_ATOL_FP32 (fp32 exp / polynomial exp, ~1e-6 relative), bf16 grads within one bf16 rounding of the
float64 gradient (rtol 2^-7 covers the 2^-8 rounding plus the fp32 error before it).
"""
import pytest
import torch

from rlhf_fast.ops import logprob as L
from rlhf_fast.ops import logprobs_from_logits

ATOL_FP32 = 2e-5
GRAD_ATOL_FP32 = 1e-6


def reference(logits, labels, temperature=1.0, ignore_index=-100):
    """float64 log_softmax -> gather, and H = -sum p log p (0 log 0 = 0), zero where labels == ignore_index."""
    lsm = torch.log_softmax(logits.double() / temperature, dim=-1)
    valid = labels != ignore_index
    logp = lsm.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    entropy = -torch.special.xlogy(lsm.exp(), lsm.exp()).sum(-1)
    return torch.where(valid, logp, 0.0), torch.where(valid, entropy, 0.0)


def make(shape, V, dtype=torch.float32, scale=3.0, ignore_frac=0.2):
    logits = (torch.randn(*shape, V) * scale).to(dtype)
    labels = torch.randint(0, V, shape)
    labels[torch.rand(shape) < ignore_frac] = -100
    return logits, labels


def check_forward(backend, logits, labels, temperature=1.0, atol=ATOL_FP32):
    logp, entropy = logprobs_from_logits(logits, labels, temperature, return_entropy=True, backend=backend)
    ref_logp, ref_entropy = reference(logits, labels, temperature)
    assert logp.dtype == entropy.dtype == torch.float32 and logp.shape == labels.shape
    torch.testing.assert_close(logp.double(), ref_logp, atol=atol, rtol=0)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=atol, rtol=0)
    assert (logp <= 0).all() and (entropy >= 0).all()
    only_logp = logprobs_from_logits(logits, labels, temperature, backend=backend)
    torch.testing.assert_close(only_logp, logp, atol=atol, rtol=0)
    return logp, entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_matches_float64(backend, dtype):
    logits, labels = make((3, 5), 1000, dtype)
    check_forward(backend, logits, labels)
    check_forward(backend, logits, labels, temperature=0.7)


@pytest.mark.parametrize("V", [1, 3, 50257, 151936])
def test_vocab_not_a_block_multiple(backend, V):
    """Partial last blocks; at 151,936 in bf16 also the peers' accumulation drift on 150k+ vocabularies."""
    logits, labels = make((2,), V, torch.bfloat16 if V > 100_000 else torch.float32, ignore_frac=0.0)
    labels[-1] = V - 1  # the last column, in the partial block
    check_forward(backend, logits, labels, temperature=1.3)


def test_more_rows_than_a_grid_dimension(backend):
    """Peers launched one program per row on grid axis 1/2 and crashed at 65,536 rows."""
    logits, labels = make((65_537,), 3, ignore_frac=0.1)
    logp, entropy = check_forward(backend, logits, labels)
    assert logp[-1] != 0 or labels[-1] == -100


def test_extreme_and_degenerate_rows(backend):
    V = 257
    logits = torch.randn(8, V)
    logits[0] = 1e4                                  # all equal: H = log V
    logits[1] = -1e4                                 # all very negative: a max initialised at 0 gives -inf / NaN
    logits[2, :] = -1e4
    logits[2, 7] = 1e4                               # one-hot: logp(7) = 0 exactly, H = 0
    logits[3] = torch.linspace(-1e4, 1e4, V)
    logits[4, ::2] = float("-inf")                   # masked vocabulary entries
    logits[5] = torch.randn(V) * 1e3
    labels = torch.tensor([3, 0, 7, V - 1, 1, 5, -100, 2])
    logp, entropy = check_forward(backend, logits, labels)
    torch.testing.assert_close(entropy[0], torch.tensor(V).log().float())
    assert logp[2] == 0 and entropy[2] < 1e-30
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()


def test_regression_running_max_not_initialised_at_zero(backend):
    """All-negative logits: a running max started at 0 (instead of -inf) underflows every exp to 0."""
    logits = torch.full((4, 1000), -1e4)
    logits[:, 0] = -1e4 + 1.0
    labels = torch.tensor([0, 1, 999, 500])
    logp, _ = check_forward(backend, logits, labels)
    assert torch.isfinite(logp).all()


def test_regression_no_positive_logprobs(backend):
    """Near-one-hot rows in bf16 where rounding can push s_y - lse above 0: log-probs must stay <= 0."""
    logits = torch.randn(64, 4096) * 0.01
    logits[torch.arange(64), torch.arange(64)] = 40.0
    for dtype in (torch.float32, torch.bfloat16):
        logp = logprobs_from_logits(logits.to(dtype), torch.arange(64), backend=backend)
        assert (logp <= 0).all()


def grad_check(backend, logits, labels, temperature, use_logp, use_entropy, dtype):
    logits = logits.to(dtype)
    g_logp, g_ent = torch.randn(labels.shape), torch.randn(labels.shape)   # per token: no reduction
    x = logits.detach().clone().requires_grad_()
    logp, entropy = logprobs_from_logits(x, labels, temperature, return_entropy=True, backend=backend)
    ((logp * g_logp).sum() * use_logp + (entropy * g_ent).sum() * use_entropy).backward()
    x64 = logits.detach().double().requires_grad_()
    r_logp, r_ent = reference(x64, labels, temperature)
    ((r_logp * g_logp.double()).sum() * use_logp + (r_ent * g_ent.double()).sum() * use_entropy).backward()
    assert x.grad.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(x.grad.double(), x64.grad, atol=GRAD_ATOL_FP32, rtol=1e-5)
    else:
        torch.testing.assert_close(x.grad.double(), x64.grad, atol=GRAD_ATOL_FP32, rtol=2**-7)
    ignored = labels == -100
    assert ignored.any() and (x.grad[ignored] == 0).all()


@pytest.mark.parametrize("use_logp,use_entropy", [(1, 0), (0, 1), (1, 1)], ids=["logp", "entropy", "both"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_autograd_float64(backend, use_logp, use_entropy, dtype):
    """Per-token upstream gradients (reduction='none'), the case where peers' fused backward went wrong."""
    logits, labels = make((2, 6), 300, scale=2.0)
    labels[0, 0] = -100
    grad_check(backend, logits, labels, 0.8, use_logp, use_entropy, dtype)


def test_entropy_only_output_gets_no_logp_gradient(backend):
    """Using only the entropy (e.g. an entropy bonus) must not add the (1[j=y] - p) / tau term."""
    logits, labels = make((4,), 50, ignore_frac=0.0)
    x = logits.clone().requires_grad_()
    logprobs_from_logits(x, labels, return_entropy=True, backend=backend)[1].sum().backward()
    x64 = logits.double().requires_grad_()
    reference(x64, labels)[1].sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=GRAD_ATOL_FP32, rtol=1e-5)


def test_noncontiguous_and_padded_inputs(backend):
    """logits[:, :-1] (rows not evenly strided), a transposed vocabulary axis, left/right padding, B = 1, T = 1."""
    logits, labels = make((3, 9), 130, ignore_frac=0.0)
    labels[0, :3] = -100   # left padding
    labels[1, -4:] = -100  # right padding
    labels[2, :] = -100    # fully masked row
    x = logits.clone().requires_grad_()
    logp, entropy = logprobs_from_logits(x[:, :-1], labels[:, 1:], return_entropy=True, backend=backend)
    (logp.sum() + entropy.sum()).backward()
    x64 = logits.double().requires_grad_()
    r_logp, r_ent = reference(x64[:, :-1], labels[:, 1:])
    (r_logp.sum() + r_ent.sum()).backward()
    torch.testing.assert_close(logp.double(), r_logp, atol=ATOL_FP32, rtol=0)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=GRAD_ATOL_FP32, rtol=1e-5)
    assert (x.grad[2] == 0).all() and (logp[2] == 0).all()
    transposed = logits.transpose(1, 2).contiguous().transpose(1, 2)
    check_forward(backend, transposed, labels)
    check_forward(backend, logits[:1, :1], labels[:1, :1].clamp(min=0))


def test_building_blocks(backend):
    """The [N, V] forward/backward used by linear_logprob: lse, in-place backward into the logits buffer."""
    if backend == "torch":
        pytest.skip("torch building blocks are checked through the other backends' comparisons")
    logits, labels = make((12,), 500)
    logp, entropy, lse = L.logprob_entropy_forward(logits, labels, 0.9, -100, True, backend)
    ref_logp, ref_entropy = reference(logits, labels, 0.9)
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits.double() / 0.9, -1), atol=ATOL_FP32, rtol=0)
    torch.testing.assert_close(logp.double(), ref_logp, atol=ATOL_FP32, rtol=0)
    assert L.logprob_entropy_forward(logits, labels, 0.9, -100, False, backend)[1] is None
    g_logp, g_ent = torch.randn(12), torch.randn(12)
    expected = L.logprob_entropy_backward(logits, labels, lse, g_logp, g_ent, 0.9, -100, "torch")
    for given_entropy in (None, entropy):
        got = L.logprob_entropy_backward(logits, labels, lse, g_logp, g_ent, 0.9, -100, backend,
                                         entropy=given_entropy)
        torch.testing.assert_close(got, expected, atol=GRAD_ATOL_FP32, rtol=1e-5)
    for dtype in (torch.float32, torch.bfloat16):
        buf = logits.to(dtype, copy=True)
        out = L.logprob_entropy_backward(buf, labels, lse, g_logp, None, 0.9, -100, backend, out=buf)
        assert out.data_ptr() == buf.data_ptr() and out.dtype == dtype
        ref = L.logprob_entropy_backward(logits.to(dtype), labels, lse, g_logp, None, 0.9, -100, "torch")
        torch.testing.assert_close(out.float(), ref.float(), atol=GRAD_ATOL_FP32, rtol=2**-7)


def test_building_blocks_with_labels_outside_the_row(backend):
    """One vocabulary slice of the tiled lm_head: a row whose label lies in another slice (>= V here) has
    logp = 0, the slice's own lse and H, and the gradient of (-g_logp * lse + g_H * H), no one-hot term."""
    V = 300
    logits, _ = make((9,), V)
    labels = torch.tensor([0, V - 1, V, V + 7, -1, V, 5, V, V])       # -1: ignored (the tiles' ignore_index)
    logp, entropy, lse = L.logprob_entropy_forward(logits, labels, 1.3, -1, True, backend)
    z = logits.double().requires_grad_()
    lsm = torch.log_softmax(z / 1.3, -1)
    ref_lse, ref_h = torch.logsumexp(z / 1.3, -1), -(lsm.exp() * lsm).sum(-1)
    inside, ignored = labels.lt(V) & labels.ge(0), labels.eq(-1)
    ref_logp = torch.where(inside, lsm.gather(-1, labels.clamp(0, V - 1)[:, None])[:, 0], 0.0)
    torch.testing.assert_close(logp.double(), ref_logp.detach(), atol=ATOL_FP32, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse.detach(), atol=ATOL_FP32, rtol=0)
    torch.testing.assert_close(entropy.double(), torch.where(ignored, 0.0, ref_h).detach(), atol=ATOL_FP32, rtol=0)
    g_logp, g_ent = torch.randn(9), torch.randn(9)
    f = torch.where(ignored, 0.0, g_logp * torch.where(inside, ref_logp, -ref_lse) + g_ent * ref_h).sum()
    expected, = torch.autograd.grad(f, z)
    got = L.logprob_entropy_backward(logits, labels, lse, g_logp, g_ent, 1.3, -1, backend, entropy=entropy)
    torch.testing.assert_close(got.double(), expected, atol=GRAD_ATOL_FP32, rtol=1e-5)


def test_auto_backend_on_cpu():
    from rlhf_fast._backend import native_available, resolve_backend
    logits, labels = make((2, 3), 10)
    assert resolve_backend("auto", logits) == ("native" if native_available() else "torch")
    torch.testing.assert_close(logprobs_from_logits(logits, labels),
                               logprobs_from_logits(logits, labels, backend="torch"), atol=ATOL_FP32, rtol=0)


@pytest.mark.parametrize("bad,error,match", [
    (dict(labels=torch.tensor([[0, 10]])), ValueError, "labels must lie in"),
    (dict(labels=torch.tensor([[0, -1]])), ValueError, "labels must lie in"),
    (dict(labels=torch.tensor([0, 1])), ValueError, "labels must have shape"),
    (dict(labels=torch.tensor([[0.0, 1.0]])), TypeError, "labels must be an integer"),
    (dict(logits=torch.ones(1, 2, 10, dtype=torch.int64)), TypeError, "logits must be a floating-point"),
    (dict(logits=[[0.0] * 10]), TypeError, "logits must be a torch.Tensor"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(ignore_index=-100.0), TypeError, "ignore_index"),
    (dict(backend="cuda"), ValueError, "backend"),
])
def test_bad_input_raises_before_any_kernel(monkeypatch, bad, error, match):
    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel ran before the input was validated")
    monkeypatch.setattr(L, "logprob_entropy_forward", no_kernel)
    monkeypatch.setattr(L, "logprob_entropy_torch", no_kernel)
    args = dict(logits=torch.randn(1, 2, 10), labels=torch.tensor([[0, 9]]))
    args.update(bad)
    with pytest.raises(error, match=match):
        logprobs_from_logits(**args)
