"""Launch configurations of the Triton kernels: the one place both the launchers and the static kernel report
(``python -m benchmarks kernels``) read, so the report compiles exactly what a GPU would run.

Row-wise kernels (kl shape_rewards, gae, masked stats, policy and value losses): tiles of ``ROWS x BLOCK_T``
elements, at most ``ROW_MAX_ELEMS`` (4096) per program, ``ROW_WARPS`` (8) warps: 16 elements per thread and
input. With 4 warps (32 per thread) the report found the policy-loss forward at 255 registers with 16-152 bytes
of spills (sm_90, bf16 and fp32) and the GAE kernel's short-row tile (256 x 16) spilling 1 KB; with 8 warps the
policy forward needs ~150-190 registers. GAE keeps two scans' worth of values live per element, so its tiles
are capped at ``GAE_MAX_ELEMS`` (2048): at 4096 the 256 x 16 tile still sits at 255 registers with a spill.
Elementwise kernels (kl forward/backward): ``ELEMENTWISE_BLOCK`` elements per program, ``ELEMENTWISE_WARPS``.

Log-prob from logits: ``R`` rows x ``BLOCK_V`` columns, at most 4096 per program (2^14 under the interpreter,
which prefers few wide programs), 8 warps from 2048 elements per tile up. (8 warps from BLOCK_V = 2048 only
left a tiny vocabulary's 256 x 16 tile on 4 warps: the bf16 backward spilled 8 bytes on sm_90 with triton 3.6.)

Fused lm_head (``linear_logprob_tile``), per operand dtype and architecture, chosen from the static report
(registers / spills / tensor-core instructions of every candidate on sm_80 and sm_90, triton 3.9 and 3.6):

=============  =====  ======================  ==========================================================
dtype          arch   BLOCK_N x V x K, warps  why
=============  =====  ======================  ==========================================================
bf16 / fp16    all    64 x 128 x 64, 8        HGMMA (sm_90) / HMMA (sm_80), ~175 registers, no spill;
                                              128 x 128 x 64 spills on both
fp32 (tf32)    all    64 x 128 x 32, 8        the bf16 tile's bytes per K slice (32 fp32 = 64 bf16):
                                              same shared memory, HGMMA / HMMA, no spill
fp32 (IEEE)    sm_90  64 x 128 x 64, 8        FFMA only (no fp32 tensor-core path); ~205 registers,
                                              no spill
fp32 (IEEE)    sm_80  64 x 128 x 32, 8        K = 64 needs 255 registers and spills ~250 bytes on sm_80
                                              (LDL/STL); K = 32 halves the live operand tiles: no spill
=============  =====  ======================  ==========================================================
"""
from __future__ import annotations

from typing import NamedTuple

import triton

ROW_MAX_BLOCK_T = 1024
ROW_MAX_ELEMS = 4096
ROW_WARPS = 8
GAE_MAX_ELEMS = 2048
ELEMENTWISE_BLOCK = 1024
ELEMENTWISE_WARPS = 4


def row_tiling(R: int, T: int, max_block_t: int = ROW_MAX_BLOCK_T, max_elems: int = ROW_MAX_ELEMS
               ) -> tuple[int, int, tuple[int]]:
    """``(rows, block_t, grid)``: tiles of at most ``max_elems`` elements; short rows are packed many to a
    program, so the grid stays small (and within limits) even for hundreds of thousands of rows."""
    block_t = min(triton.next_power_of_2(T), max_block_t)
    rows = max(1, min(max_elems // block_t, triton.next_power_of_2(R)))
    return rows, block_t, (triton.cdiv(R, rows),)


def row_tiling_extremes(max_elems: int = ROW_MAX_ELEMS) -> list[tuple[int, int]]:
    """The (rows, block_t) tiles the report compiles: full tiles at both ends of the range (long rows,
    e.g. 4 x 1024, and short rows packed, e.g. 256 x 16); smaller tiles hold fewer elements per thread."""
    return [(max(1, max_elems // ROW_MAX_BLOCK_T), ROW_MAX_BLOCK_T), (max_elems // 16, 16)]


def logprob_tiling(N: int, V: int, interpreting: bool) -> tuple[int, int, int]:
    """``(R rows per program, BLOCK_V, num_warps)`` of the log-prob kernels."""
    tile = 2**14 if interpreting else 4096
    block_v = min(triton.next_power_of_2(V), tile)
    rows = max(1, min(triton.next_power_of_2(max(N, 1)), tile // block_v))
    return rows, block_v, 8 if rows * block_v >= 2048 else 4


def logprob_tiling_extremes() -> list[tuple[int, int, int]]:
    """A large vocabulary (one row, 4096 columns, 8 warps) and a tiny one (256 rows x 16 columns, 4 warps)."""
    return [logprob_tiling(1 << 20, 128_000, False), logprob_tiling(1 << 20, 16, False)]


class LinearTile(NamedTuple):
    block_n: int
    block_v: int
    block_k: int
    num_warps: int
    dot_precision: str | None   # tl.dot input_precision: None (bf16/fp16), "tf32" or "ieee"


def linear_logprob_tile(dtype: str, cc: int | None, allow_tf32: bool = False) -> LinearTile:
    """The fused lm_head tile for operand ``dtype`` ("bf16", "fp16", "fp32") on compute capability ``cc``
    (major * 10 + minor; None: the interpreter). See the module docstring for the reasoning."""
    if cc is None:
        return LinearTile(16, 512, 32, 4, "ieee" if dtype == "fp32" else None)
    if dtype != "fp32":
        return LinearTile(64, 128, 64, 8, None)
    if allow_tf32:
        return LinearTile(64, 128, 32, 8, "tf32")
    return LinearTile(64, 128, 64 if cc >= 90 else 32, 8, "ieee")
