"""linear_ppo_objective (the fused PPO objective from hidden states) against float64 autograd of the unfused
objective: explicit [B, T, V] logits -> log_softmax -> ppo_policy_loss's reference -> the agg of the entropy.

Tolerances as tests/test_linear_logprob.py: fp32 values within ~1e-5 (fp32 dot products over H <= 48 terms of
O(1) values), gradients rtol 1e-4 / atol 1e-5 relative to their scale; bf16 (logits rounded to bf16) 3%.
"""
import pytest
import torch

from rlhf_fast.ops import linear_ppo, linear_ppo_objective
from rlhf_fast.ops.agg import aggregate
from rlhf_fast.ops.policy_loss import policy_loss_torch

FUSED_AGGS = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def reference(h, w, b, labels, old, adv, mask, *, agg="token-mean", clip_low=0.2, clip_high=0.2, dual_clip=None,
              entropy_coef=0.0, temperature=1.0, softcap=None, rollout_logp=None, tis_cap=None, loss_scale=1.0):
    """The unfused objective in float64 with plain autograd: (loss, stats)."""
    z = h.double() @ w.double().t()
    if b is not None:
        z = z + b.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logsm = torch.log_softmax(z / temperature, dim=-1)
    logp = logsm.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    entropy = -(logsm.exp() * logsm).sum(-1)
    pg, stats = policy_loss_torch(logp, old.double(), adv.double(), mask, clip_low, clip_high, dual_clip, agg,
                                  None if rollout_logp is None else rollout_logp.double(), tis_cap,
                                  dtype=torch.float64)
    loss = (pg - entropy_coef * aggregate(entropy, mask, agg)) * loss_scale
    stats["entropy"] = torch.where(mask, entropy, 0.0).sum() / mask.sum().clamp(min=1)
    return loss, stats, logp


def problem(B, T, H, V, dtype=torch.float32, masked_rows=(), seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    for r in masked_rows:
        mask[r] = False
    with torch.no_grad():
        ref_logp = torch.log_softmax((h.double() @ w.double().t()), -1).gather(-1, labels[..., None])[..., 0]
    old = (ref_logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()   # ratios in ~[0.5, 2]
    adv = torch.randn(B, T, generator=g)
    rollout = (old.double() + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    return dict(h=h, w=w, b=b, labels=labels, old=old, adv=adv, mask=mask, rollout=rollout)


def run_both(p, backend, chunk_size=None, **kw):
    """(ours, ref): each (loss, stats, grads (dh, dW[, db])) for one problem."""
    leaves = [t.detach().clone().requires_grad_() for t in (p["h"], p["w"], p["b"]) if t is not None]
    rollout = p["rollout"] if kw.get("tis_cap") is not None else None
    loss, stats = linear_ppo_objective(leaves[0], leaves[1], p["labels"], p["old"], p["adv"], p["mask"],
                                       bias=leaves[2] if len(leaves) > 2 else None, rollout_logp=rollout,
                                       return_entropy=True, chunk_size=chunk_size, backend=backend, **kw)
    grads = torch.autograd.grad(loss, leaves)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rloss, rstats, _ = reference(*ref_leaves[:2], ref_leaves[2] if len(leaves) > 2 else None, p["labels"],
                                 p["old"], p["adv"], p["mask"], rollout_logp=rollout, **kw)
    rgrads = torch.autograd.grad(rloss, ref_leaves)
    return (loss, stats, grads), (rloss, rstats, rgrads)


def assert_close_rel(got, want, rtol, name):
    """Frobenius error relative to the reference's scale (plus a floor for an all-zero reference)."""
    err = (got.double() - want).norm().item()
    scale = want.norm().item() + 1e-12
    assert err <= rtol * scale + 1e-9, f"{name}: relative error {err / scale:.3e} > {rtol}"


def check(ours, ref, rtol_grad=1e-4, atol_loss=1e-5, stat_atol=1e-5):
    (loss, stats, grads), (rloss, rstats, rgrads) = ours, ref
    assert loss.dtype in (torch.float32, torch.float64) and loss.dim() == 0
    torch.testing.assert_close(loss.double(), rloss.detach(), atol=atol_loss, rtol=1e-5)
    assert stats.keys() == rstats.keys()
    for k in stats:
        torch.testing.assert_close(stats[k].double(), rstats[k].double(), atol=stat_atol, rtol=1e-4, msg=k)
    for name, g, rg in zip(("dh", "dW", "db"), grads, rgrads):
        assert_close_rel(g, rg, rtol_grad, name)


@pytest.mark.parametrize("agg", FUSED_AGGS)
def test_fp32_every_agg_matches_float64_unfused(backend, agg):
    p = problem(3, 7, 24, 301, masked_rows=(1,))     # a fully masked row, V not a block multiple
    kw = dict(agg=agg, clip_high=0.28, dual_clip=3.0, entropy_coef=0.01)
    check(*run_both(p, backend, chunk_size=5, **kw))


@pytest.mark.parametrize("opts", [dict(temperature=0.7), dict(softcap=2.5, temperature=1.3),
                                  dict(tis_cap=1.5, loss_scale=0.25), dict(bias=True)],
                         ids=["temperature", "softcap", "tis-loss_scale", "bias"])
def test_fp32_options_match_float64_unfused(backend, opts):
    opts = dict(opts)
    p = problem(2, 9, 16, 257, bias=opts.pop("bias", False))
    check(*run_both(p, backend, chunk_size=4, entropy_coef=0.02, **opts))


def test_bf16_matches_float64_unfused(backend):
    p = problem(4, 16, 32, 500, dtype=torch.bfloat16)
    ours, ref = run_both(p, backend, chunk_size=16, entropy_coef=0.01, agg="seq-mean-token-mean")
    # bf16 logits (relative 2^-9, |z| <= ~4) -> logp errors ~0.01; the loss is a weighted mean of such terms
    check(ours, ref, rtol_grad=0.03, atol_loss=0.01, stat_atol=0.02)
    assert ours[2][0].dtype == torch.bfloat16 and ours[2][1].dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_logits_in_vocabulary_slices(backend, dtype, monkeypatch):
    """Logits written slice by slice (64 columns; V = 301 leaves a 45-column last slice), bias and soft cap on."""
    monkeypatch.setattr(linear_ppo, "_LOGIT_SLICE", {"cpu": 64, "cuda": 64})
    p = problem(3, 7, 24, 301, dtype=dtype, masked_rows=(1,), bias=True)
    ours, ref = run_both(p, backend, chunk_size=5, softcap=2.5, entropy_coef=0.01)
    tol = dict(rtol_grad=0.03, atol_loss=0.01, stat_atol=0.02) if dtype == torch.bfloat16 else {}
    check(ours, ref, **tol)


def test_awkward_shapes(backend):
    for B, T, V, masked in ((1, 1, 7, ()), (2, 3, 1, ()), (3, 2, 65, (0, 1, 2))):    # N=1, V=1, all masked
        p = problem(B, T, 8, V, masked_rows=masked)
        ours, ref = run_both(p, backend, entropy_coef=0.1)
        check(ours, ref)
        if len(masked) == B:
            assert ours[0].item() == 0.0 and all(g.abs().max() == 0 for g in ours[2])


def test_more_than_65536_rows(backend):
    if backend == "triton":
        pytest.skip("the Triton kernels' >65,536-row grids are covered in test_linear_logprob/test_policy_loss")
    p = problem(2, 33_000, 4, 9)              # 66,000 tokens: past the 65,535 grid limit peers crash at
    check(*run_both(p, backend, chunk_size=40_000, entropy_coef=0.01))


def test_on_policy_pass_and_token_outputs(backend):
    p = problem(2, 5, 8, 33, masked_rows=(1,))
    h = p["h"].requires_grad_()
    loss, stats, logp, ent = linear_ppo_objective(h, p["w"], p["labels"], None, p["adv"], p["mask"],
                                                  entropy_coef=0.1, return_tokens=True, backend=backend)
    _, rstats, ref_logp = reference(h, p["w"], None, p["labels"], p["old"], p["adv"], p["mask"])
    torch.testing.assert_close(logp.double(), torch.where(p["mask"], ref_logp, 0.0).detach(), atol=1e-5, rtol=0)
    assert (ent[~p["mask"]] == 0).all() and (ent[p["mask"]] > 0).all()
    torch.testing.assert_close(ent.sum().double() / p["mask"].sum(), rstats["entropy"], atol=1e-5, rtol=0)
    loss2, _ = linear_ppo_objective(h, p["w"], p["labels"], logp, p["adv"], p["mask"], entropy_coef=0.1,
                                    backend=backend)
    torch.testing.assert_close(loss, loss2)
    assert stats["ratio_max"] == 1.0 and stats["clipfrac"] == 0.0


def test_backward_scales_the_stored_gradients_once():
    p = problem(2, 4, 8, 40)
    h = p["h"].requires_grad_()
    loss, _ = linear_ppo_objective(h, p["w"], p["labels"], p["old"], p["adv"], p["mask"])
    (g1,) = torch.autograd.grad(loss, h, retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        torch.autograd.grad(loss, h)
    loss, _ = linear_ppo_objective(h, p["w"], p["labels"], p["old"], p["adv"], p["mask"])
    (g3,) = torch.autograd.grad(3.0 * loss, h)
    torch.testing.assert_close(g3, 3.0 * g1)


def test_bad_arguments():
    p = problem(2, 4, 8, 40)
    args = (p["h"], p["w"], p["labels"], p["old"], p["adv"], p["mask"])
    with pytest.raises(ValueError, match="agg='none'"):
        linear_ppo_objective(*args, agg="none")
    with pytest.raises(ValueError, match="advantages"):
        linear_ppo_objective(*args[:4], p["adv"][:, :3], p["mask"])
    with pytest.raises(ValueError, match="hidden"):
        linear_ppo_objective(p["h"][0], *args[1:])
    with pytest.raises(ValueError, match="tis_cap"):
        linear_ppo_objective(*args, tis_cap=2.0)
    with pytest.raises(ValueError, match="loss_scale"):
        linear_ppo_objective(*args, loss_scale=float("nan"))
