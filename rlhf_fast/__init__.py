"""rlhf_fast: fused kernels for the PPO hot path, and a thin RLHF trainer on top.

Every op lives in :mod:`rlhf_fast.ops` with three backends (Triton on CUDA, native C++ on CPU,
plain PyTorch as the reference that defines the math).
"""
from rlhf_fast._backend import native_available, triton_available

__version__ = "0.1.0"
__all__ = ["native_available", "triton_available", "__version__"]
