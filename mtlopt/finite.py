"""Checks on gradients with one transfer to the host: non-finite entries, and all-zero tasks.

Euclidean norms are read (one fast reduction each; the ∞-norm kernel is ~20× slower on CPU): a
norm is NaN or infinite if an entry is, and zero only if every entry is. Two rare cases are then
re-checked exactly: a finite row whose squares overflow, and a non-zero row whose squares
underflow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class TaskCheck:
    finite: bool
    zero: bool
    """Every gradient entry of the task is exactly zero."""


def check_tasks(
    jacobian: Tensor,
    own: Sequence[Sequence[Tensor | None]],
    row_squares: Sequence[float] | None = None,
) -> list[TaskCheck]:
    """For each task (a row of ``J`` and the gradients of its own parameters): whether all its
    gradients are finite and whether they are all zero, with one transfer to the host.

    ``row_squares``: the rows' squared norms when already known (the diagonal of ``J Jᵀ``, which
    is non-finite if a row has a NaN or an infinity): ``J`` is then not read again."""
    num_tasks = jacobian.shape[0]
    if row_squares is not None:
        rows = torch.tensor(np.asarray(row_squares, dtype=np.float64)).clamp_min(0).sqrt()
    elif jacobian.shape[1] > 0:
        rows = torch.linalg.vector_norm(jacobian, dim=1).double()
    else:
        rows = torch.zeros(num_tasks, dtype=torch.float64, device=jacobian.device)
    owned = [(task, g) for task, grads in enumerate(own) for g in grads if g is not None]
    norms = _norms([g for _, g in owned]).to(rows.device)
    values = torch.cat([rows, norms]).tolist()
    finite = [_finite(v, jacobian[k]) for k, v in enumerate(values[:num_tasks])]
    zero = [v == 0.0 and not bool(jacobian[k].any()) for k, v in enumerate(values[:num_tasks])]
    for (task, g), v in zip(owned, values[num_tasks:], strict=True):
        finite[task] = finite[task] and _finite(v, g)
        zero[task] = zero[task] and v == 0.0 and not bool(_dense_values(g).any())
    return [TaskCheck(f, z) for f, z in zip(finite, zero, strict=True)]


def finite_tensors(grads: Sequence[Tensor | None]) -> bool:
    """Whether every given tensor is finite (one transfer to the host)."""
    present = [g for g in grads if g is not None]
    return all(_finite(v, g) for v, g in zip(_norms(present).tolist(), present, strict=True))


def combination_bounded(weights: Tensor, gramian: np.ndarray, dtype: torch.dtype) -> bool:
    """Whether ``wᵀJ`` is surely finite in ``dtype`` without reading it: every entry, and every
    partial sum forming it, is at most ``Σ_i |w_i| ‖g_i‖`` in magnitude, with ``‖g_i‖² = G_ii``
    of a finite ``J``."""
    w = np.abs(weights.detach().double().cpu().numpy())
    bound = float(w @ np.sqrt(np.clip(np.diagonal(gramian), 0.0, None)))
    return math.isfinite(bound) and bound < torch.finfo(dtype).max / 4


def all_finite(values: Tensor) -> bool:
    return bool(torch.isfinite(values).all())


def _finite(norm: float, tensor: Tensor) -> bool:
    return math.isfinite(norm) or bool(torch.isfinite(_dense_values(tensor)).all())


def _norms(grads: Sequence[Tensor]) -> Tensor:
    """Each tensor's Euclidean norm in float64, on one device."""
    if not grads:
        return torch.zeros(0, dtype=torch.float64)
    values = [_dense_values(g) for g in grads]
    return torch.stack(torch._foreach_norm(values, 2)).double()  # stack promotes mixed dtypes


def _dense_values(g: Tensor) -> Tensor:
    return g._values() if g.is_sparse else g
