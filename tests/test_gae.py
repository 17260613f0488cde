"""gae: every backend against a float64 GAE computed on the compressed valid positions of each row."""
import pytest
import torch

from rlhf_fast._backend import native_module, triton_available, triton_interpreting
from rlhf_fast.ops import gae
from rlhf_fast.ops.gae import gae_torch

from _rl_inputs import awkward_mask, device_for

# Inputs of either dtype are upcast exactly to fp32 and the recursion runs in fp32, so both are held to
# the fp32 accumulation error of a T <= 40 step recursion on O(1) values (a bf16-accumulating kernel
# would be off by ~1e-2 and fail).
ATOL = RTOL = 2e-5


def gae_naive(r, v, m, gamma, lam):
    """Textbook GAE (float64) on each row's valid positions only, scattered back; 0 elsewhere."""
    adv = torch.zeros(r.shape, dtype=torch.float64)
    for b in range(r.shape[0]):
        idx = m[b].nonzero().flatten().tolist()
        last, v_next = 0.0, 0.0
        for t in reversed(idx):
            last = float(r[b, t]) + gamma * v_next - float(v[b, t]) + gamma * lam * last
            v_next = float(v[b, t])
            adv[b, t] = last
    return adv, torch.where(m, adv + v.double(), 0.0)


def check(backend, r, v, m, gamma=0.99, lam=0.95):
    dev = device_for(backend)
    adv, ret = gae(r.to(dev), v.to(dev), m.to(dev), gamma, lam, backend=backend)
    assert adv.dtype == ret.dtype == torch.float32 and adv.shape == r.shape
    ref_adv, ref_ret = gae_naive(r.cpu(), v.cpu(), m.bool().cpu(), gamma, lam)
    torch.testing.assert_close(adv.cpu().double(), ref_adv, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ret.cpu().double(), ref_ret, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (1.0, 1.0), (0.5, 0.0)])
def test_matches_float64(backend, dtype, gamma, lam):
    B, T = 12, 37
    r, v = torch.randn(B, T).to(dtype), torch.randn(B, T).to(dtype)
    check(backend, r, v, awkward_mask(B, T), gamma, lam)


@pytest.mark.parametrize("B,T", [(1, 1), (1, 9), (6, 1), (3, 2)])
def test_tiny_shapes(backend, B, T):
    check(backend, torch.randn(B, T), torch.randn(B, T), awkward_mask(B, T))


def test_fully_masked_rows_are_zero(backend):
    dev = device_for(backend)
    m = torch.zeros(3, 8, dtype=torch.bool, device=dev)
    m[1, 2:5] = True
    adv, ret = gae(torch.randn(3, 8, device=dev), torch.randn(3, 8, device=dev), m, backend=backend)
    assert adv[0].abs().sum() == 0 and ret[2].abs().sum() == 0 and (adv[1, 2:5] != 0).all()


def test_non_contiguous_and_numeric_mask(backend):
    dev = device_for(backend)
    r = torch.randn(21, 10, device=dev).t()      # [10, 21] transposed view
    v = torch.randn(10, 42, device=dev)[:, ::2]  # strided columns
    m = awkward_mask(10, 21).to(torch.int64)     # {0, 1} integer mask
    assert not r.is_contiguous() and not v.is_contiguous()
    check(backend, r, v, m)


def test_many_rows(backend):
    """More rows than a CUDA grid's y/z limit (65,535), tiny T: catches grid and row-indexing limits.
    The Triton interpreter runs tl.associative_scan element by element (~0.5 ms each), so there it uses
    1,000 rows (one packed program); the real grid is exercised on a GPU."""
    B, T = (1_000 if backend == "triton" and triton_interpreting() else 70_000), 3
    r, v, m = torch.randn(B, T), torch.randn(B, T), torch.rand(B, T) < 0.7
    dev = device_for(backend)
    adv, ret = gae(r.to(dev), v.to(dev), m.to(dev), 0.9, 0.8, backend=backend)
    ref_adv, ref_ret = gae_torch(r, v, m, 0.9, 0.8, dtype=torch.float64)   # itself checked against gae_naive
    torch.testing.assert_close(adv.cpu().double(), ref_adv, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ret.cpu().double(), ref_ret, atol=ATOL, rtol=RTOL)


@pytest.mark.skipif(not triton_available("cuda" if torch.cuda.is_available() else "cpu"), reason="no triton")
def test_triton_multi_tile_rows():
    """Rows longer than a tile: both carries (advantage and next value) cross tile boundaries."""
    from rlhf_fast.kernels.gae import gae_triton
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    B, T = 6, 29
    r, v, m = torch.randn(B, T), torch.randn(B, T), awkward_mask(B, T)
    m[2, 8:16] = False                           # a gap covering a whole 8-wide tile
    adv, ret = gae_triton(r.to(dev), v.to(dev), m.to(dev), 0.97, 0.9, max_block_t=8)
    ref_adv, ref_ret = gae_naive(r, v, m, 0.97, 0.9)
    torch.testing.assert_close(adv.cpu().double(), ref_adv, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ret.cpu().double(), ref_ret, atol=ATOL, rtol=RTOL)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not hasattr(native_module() or object(), "gae_forward_cuda"),
                    reason="needs a CUDA build of rlhf_fast._C")
def test_cuda_warp_scan_kernel():
    B, T = 70, 100                               # several 32-wide chunks, several 4-row blocks
    r, v, m = torch.randn(B, T), torch.randn(B, T), awkward_mask(B, T)
    adv, ret = native_module().gae_forward_cuda(r.cuda(), v.cuda(), m.cuda(), 0.99, 0.95)
    ref_adv, ref_ret = gae_naive(r, v, m, 0.99, 0.95)
    torch.testing.assert_close(adv.cpu().double(), ref_adv, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ret.cpu().double(), ref_ret, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("kwargs,err,match", [
    ({"gamma": 1.5}, ValueError, "gamma"),
    ({"lam": -0.1}, ValueError, "lam"),
    ({"mask": torch.ones(4, 6, dtype=torch.bool)}, ValueError, "mask"),
    ({"mask": torch.ones(4, 5, dtype=torch.complex64)}, TypeError, "mask"),
    ({"rewards": torch.ones(4, 5, dtype=torch.int64)}, TypeError, "rewards"),
    ({"rewards": torch.ones(20)}, ValueError, "rewards"),
    ({"values": torch.ones(4, 6)}, ValueError, "values"),
])
def test_bad_input_raises_before_any_kernel(backend, kwargs, err, match):
    dev = device_for(backend)
    args = {"rewards": torch.randn(4, 5), "values": torch.randn(4, 5), "mask": torch.ones(4, 5, dtype=torch.bool),
            "gamma": 0.9, "lam": 0.9, **kwargs}
    args = {k: a.to(dev) if isinstance(a, torch.Tensor) else a for k, a in args.items()}
    args.setdefault("backend", backend)
    with pytest.raises(err, match=match):
        gae(**args)


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="backend"):
        gae(torch.randn(2, 3), torch.randn(2, 3), torch.ones(2, 3), backend="cuda")
