"""Checks on gradients with one transfer to the host: non-finite entries, and all-zero tasks."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def task_magnitudes(jacobian: Tensor, own: Sequence[Sequence[Tensor | None]]) -> list[float]:
    """Each task's largest gradient magnitude over its row of ``J`` and its own parameters' gradients
    (NaN or inf if any entry is), with one transfer to the host whatever the number of tasks."""
    num_tasks = jacobian.shape[0]
    rows = (
        torch.linalg.vector_norm(jacobian, math.inf, dim=1).double()
        if jacobian.shape[1] > 0
        else torch.zeros(num_tasks, dtype=torch.float64, device=jacobian.device)
    )
    owned = [(task, g) for task, grads in enumerate(own) for g in grads if g is not None]
    magnitudes = largest_magnitudes([g for _, g in owned]).to(rows.device)
    values = torch.cat([rows, magnitudes]).tolist()
    result = values[:num_tasks]
    for (task, _), v in zip(owned, values[num_tasks:], strict=True):
        if not math.isfinite(v) or not math.isfinite(result[task]):
            result[task] = math.nan if math.isnan(v) or math.isnan(result[task]) else math.inf
        else:
            result[task] = max(result[task], v)
    return result


def finite_tensors(grads: Sequence[Tensor | None]) -> bool:
    """Whether every given tensor is finite (one transfer to the host)."""
    return all(math.isfinite(v) for v in largest_magnitudes(grads).tolist())


def largest_magnitudes(grads: Sequence[Tensor | None]) -> Tensor:
    """Each present tensor's largest |entry| in float64 (NaN or inf if it holds one), on one device."""
    present = [g._values() if g.is_sparse else g for g in grads if g is not None]
    if not present:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack([n.double() for n in torch._foreach_norm(present, math.inf)])


def all_finite(values: Tensor) -> bool:
    return bool(torch.isfinite(values).all())
