"""Triton kernels, shipped as ``rlhf_fast.kernels`` (never a top-level ``kernels`` package).

Each module holds the kernels of one op family and a launcher the ops call; all run on
triton 3.6 and 3.9, and on CPU under ``TRITON_INTERPRET=1``.
"""
