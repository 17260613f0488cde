"""Preference losses (rlhf_fast.ops.preference_loss): values and the closed-form backward against autograd of
the papers' formulas written out here, in float64."""
import pytest
import torch
import torch.nn.functional as F

from rlhf_fast.ops import preference_loss


def _inputs(B=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    lc, lr, rc, rr = (-(torch.rand(B, generator=g, dtype=torch.float64) * 40 + 1) for _ in range(4))
    nc = torch.randint(1, 30, (B,), generator=g)
    nr = torch.randint(1, 30, (B,), generator=g)
    return lc, lr, rc, rr, nc, nr


def _formula(loss_type, lc, lr, rc, rr, nc, nr, beta, eps, gamma):
    """The papers' per-pair losses, averaged (independent of the implementation)."""
    if loss_type == "sigmoid":          # DPO / cDPO
        z = beta * ((lc - rc) - (lr - rr))
        return (-(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)).mean()
    if loss_type == "hinge":
        return torch.relu(1 - beta * ((lc - rc) - (lr - rr))).mean()
    if loss_type == "ipo":
        h = (lc - rc) / nc - (lr - rr) / nr
        return ((h - 1 / (2 * beta)) ** 2).mean()
    z = beta * (lc / nc - lr / nr) - gamma   # simpo
    return (-(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)).mean()


CASES = [("sigmoid", 0.1, 0.0, 0.0), ("sigmoid", 0.5, 0.2, 0.0), ("hinge", 0.1, 0.0, 0.0), ("hinge", 0.02, 0.0, 0.0),
         ("ipo", 0.1, 0.0, 0.0), ("ipo", 2.0, 0.0, 0.0), ("simpo", 2.0, 0.0, 0.5), ("simpo", 2.5, 0.1, 1.0)]


@pytest.mark.parametrize("loss_type,beta,eps,gamma", CASES)
def test_value_and_gradient_match_autograd_float64(loss_type, beta, eps, gamma):
    lc, lr, rc, rr, nc, nr = _inputs()
    ours_in = [t.clone().requires_grad_() for t in (lc, lr)]
    ref_in = [t.clone().requires_grad_() for t in (lc, lr)]
    loss, stats = preference_loss(*ours_in, rc, rr, nc, nr, loss_type=loss_type, beta=beta,
                                  label_smoothing=eps, gamma=gamma)
    expected = _formula(loss_type, *ref_in, rc, rr, nc, nr, beta, eps, gamma)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    g = torch.autograd.grad(loss * 1.7, ours_in)
    g_ref = torch.autograd.grad(expected * 1.7, ref_in)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        assert a.abs().sum() > 0
    # TRL's implicit rewards and accuracy
    norm = (nc, nr) if loss_type == "simpo" else (1, 1)
    chosen = beta * (lc - (0 if loss_type == "simpo" else rc)) / norm[0]
    rejected = beta * (lr - (0 if loss_type == "simpo" else rr)) / norm[1]
    torch.testing.assert_close(stats["rewards/chosen"], chosen)
    torch.testing.assert_close(stats["rewards/margins"], chosen - rejected)
    torch.testing.assert_close(stats["rewards/accuracies"], (chosen > rejected).double())


def test_gradcheck_and_fp32():
    lc, lr, rc, rr, nc, nr = _inputs(B=5, seed=1)
    for loss_type in ("sigmoid", "ipo", "simpo"):
        fn = lambda a, b: preference_loss(a, b, rc, rr, nc, nr, loss_type=loss_type, beta=0.3,
                                          label_smoothing=0.0)[0]
        assert torch.autograd.gradcheck(fn, (lc.clone().requires_grad_(), lr.clone().requires_grad_()))
    loss, _ = preference_loss(lc.float(), lr.float(), rc.float(), rr.float())
    assert loss.dtype == torch.float32


def test_bad_input_names_the_argument():
    lc, lr, rc, rr, nc, nr = _inputs(B=4)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        preference_loss(lc, lr)
    with pytest.raises(ValueError, match="chosen_lengths"):
        preference_loss(lc, lr, loss_type="simpo")
    with pytest.raises(ValueError, match="loss_type"):
        preference_loss(lc, lr, rc, rr, loss_type="kto")
    with pytest.raises(ValueError, match="rejected_logps"):
        preference_loss(lc, lr[:3], rc, rr)
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss(lc, lr, rc, rr, loss_type="ipo", label_smoothing=0.1, chosen_lengths=nc, rejected_lengths=nr)
    with pytest.raises(TypeError, match="chosen_logps"):
        preference_loss(nc, lr, rc, rr)
