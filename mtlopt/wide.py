"""Products over the long side of wide T × M matrices (per-task gradients, ``J``), on the host one
cache-sized block of columns at a time."""

from __future__ import annotations

import torch
from torch import Tensor

BLOCK = 1 << 14
"""Columns per block: T × 16 k float32 stays within a core's cache for the task counts of
docs/perf.md."""


def gram(a: Tensor, b: Tensor | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """``a bᵀ`` (``a aᵀ`` when ``b`` is ``None``) in ``dtype`` (``a``'s by default).

    On the host, wide operands are multiplied block of columns by block of columns (accumulated in
    place, each block cast to ``dtype`` on its own: no T × M copy): MKL's single ``T×M @ M×T``
    product is slow at some task counts (T = 11, M = 790 k, 1 thread: 18–23 ms, against 3–8 ms
    blocked, on a busy machine; T = 11, M = 262 k: 3.7 ms against 2.3 ms)."""
    dtype = dtype or a.dtype
    tasks, width = a.shape
    same = b is None
    if a.device.type != "cpu" or width < 4 * BLOCK or (same and tasks < 3 and dtype == a.dtype):
        left = a.to(dtype)
        return left @ (left if same else b.to(dtype)).T
    product = a.new_zeros(tasks, b.shape[0] if b is not None else tasks, dtype=dtype)
    scratch = None if dtype == a.dtype else a.new_empty(tasks, BLOCK, dtype=dtype)
    scratch_b = None if same or dtype == b.dtype else b.new_empty(b.shape[0], BLOCK, dtype=dtype)
    for start in range(0, width, BLOCK):
        left = a[:, start : start + BLOCK]
        if scratch is not None:
            left = scratch[:, : left.shape[1]].copy_(left)
        if b is None:
            right = left
        else:
            right = b[:, start : start + BLOCK]
            if scratch_b is not None:
                right = scratch_b[:, : right.shape[1]].copy_(right)
        product.addmm_(left, right.T)
    return product


def column_abs_sum(jacobian: Tensor) -> Tensor:
    """``Σ_i |J_ij|`` for every column j, without a T×P temporary (``J.abs()`` of a large ``J``
    is a fresh mapping, page-faulted every step; the 1-norm along dim 0 is ~100× slower)."""
    tasks, width = jacobian.shape
    if jacobian.device.type != "cpu" or width <= BLOCK:
        return jacobian.abs().sum(dim=0)
    total = jacobian.new_empty(width)
    scratch = jacobian.new_empty(tasks, BLOCK)
    for start in range(0, width, BLOCK):
        block = jacobian[:, start : start + BLOCK]
        part = scratch[:, : block.shape[1]]
        torch.abs(block, out=part)
        torch.sum(part, dim=0, out=total[start : start + block.shape[1]])
    return total
