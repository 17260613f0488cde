"""Tile shapes shared by the row-wise kernels: ``ROWS`` rows x ``BLOCK_T`` positions per program."""
from __future__ import annotations

import triton


def row_tiling(R: int, T: int, max_block_t: int = 1024, max_elems: int = 4096) -> tuple[int, int, tuple[int]]:
    """``(rows, block_t, grid)``: tiles of at most ``max_elems`` elements; short rows are packed many to a
    program, so the grid stays small (and within limits) even for hundreds of thousands of rows."""
    block_t = min(triton.next_power_of_2(T), max_block_t)
    rows = max(1, min(max_elems // block_t, triton.next_power_of_2(R)))
    return rows, block_t, (triton.cdiv(R, rows),)
