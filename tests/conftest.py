"""Test configuration: Triton runs under its interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton.jit decorates any kernel, hence here, at import.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from rlhf_fast._backend import native_available, triton_available  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def available_backends() -> list[str]:
    """Every backend that can run here: torch always, native when built, triton on GPU or interpreter."""
    out = ["torch"]
    if native_available():
        out.append("native")
    if triton_available(DEVICE):
        out.append("triton")
    return out


@pytest.fixture(params=available_backends())
def backend(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
