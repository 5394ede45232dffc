"""Strategy state as checkpoints hold it, and per-task state restricted to the tasks of one step.

Two jobs, both on the plain values a strategy keeps between steps (NumPy arrays, tensors, the tiny
Adam's state, a generator's state):

* **Saving.** ``torch.load`` reads only tensors and Python primitives by default
  (``weights_only=True``): :func:`encode` turns NumPy arrays and Adam states into tagged dicts of
  tensors and :func:`decode` turns them back.
* **Absent tasks.** A state entry indexed by task (a :class:`TaskAxes` declaration) is cut down to
  the present tasks with :func:`take` before a step, and the step's new values are written back
  into the full state with :func:`put`, so an absent task's entries are neither read nor advanced.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._adam import AdamState

_NDARRAY = "__ndarray__"
_ADAM = "__adam__"


def encode(value: Any) -> Any:
    """``value`` with every NumPy array and Adam state replaced by tensors (deep copies)."""
    if isinstance(value, np.ndarray):
        return {_NDARRAY: torch.from_numpy(np.array(value, copy=True))}
    if isinstance(value, AdamState):
        return {_ADAM: {f.name: encode(getattr(value, f.name)) for f in fields(value)}}
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(encode(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def decode(value: Any) -> Any:
    """The inverse of :func:`encode` (returns fresh copies; the input is not changed)."""
    if isinstance(value, dict):
        if set(value) == {_NDARRAY}:
            array = value[_NDARRAY]
            if not isinstance(array, Tensor):
                raise TypeError(f"a saved array must be a tensor, got {type(array).__name__}")
            return array.detach().cpu().numpy().copy()
        if set(value) == {_ADAM}:
            parts = {k: decode(v) for k, v in value[_ADAM].items()}
            if set(parts) != {"m", "v", "t"}:
                raise KeyError(f"a saved Adam state needs m, v and t, got {sorted(parts)}")
            return AdamState(**parts)
        return {k: decode(v) for k, v in value.items()}
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return type(value)(decode(v) for v in value)
    return value


@dataclass(frozen=True)
class TaskAxes:
    """Which axes of a state entry are indexed by task, and the value of a task never seen."""

    axes: tuple[int, ...] = (0,)
    fill: float = 0.0


def task_count(value: Any, spec: TaskAxes) -> int | None:
    """The number of tasks a state entry is sized for (``None`` while it is unset)."""
    if value is None:
        return None
    if isinstance(value, AdamState):
        return task_count(value.m, spec)
    sizes = {int(value.shape[axis]) for axis in spec.axes}
    if len(sizes) != 1:
        raise ValueError(f"task axes {spec.axes} of a state entry disagree: shape {value.shape}")
    return sizes.pop()


def take(value: Any, tasks: np.ndarray, spec: TaskAxes) -> Any:
    """The entries of the present ``tasks`` (indices into the full task list)."""
    if value is None:
        return None
    if isinstance(value, AdamState):
        return _map_fields(value, lambda v: take(v, tasks, spec))
    return value[_index(value, tasks, spec)]


def put(full: Any, part: Any, tasks: np.ndarray, total: int, spec: TaskAxes) -> Any:
    """``full`` (``None``: a fresh entry filled with ``spec.fill``) with the present tasks'
    entries replaced by ``part``; ``full`` itself is not changed."""
    if part is None:
        return full
    if isinstance(part, AdamState):
        return AdamState(
            **{
                f.name: put(
                    None if full is None else getattr(full, f.name),
                    getattr(part, f.name),
                    tasks,
                    total,
                    spec,
                )
                for f in fields(part)
            }
        )
    if full is None:
        shape = [total if a in spec.axes else n for a, n in enumerate(part.shape)]
        if isinstance(part, Tensor):
            full = torch.full(shape, spec.fill, dtype=part.dtype, device=part.device)
        else:
            full = np.full(shape, spec.fill, dtype=part.dtype)
    else:
        full = full.clone() if isinstance(full, Tensor) else full.copy()
    full[_index(full, tasks, spec)] = part.to(full) if isinstance(full, Tensor) else part
    return full


def _index(value: Any, tasks: np.ndarray, spec: TaskAxes) -> tuple:
    """The open-mesh index of the present tasks' entries (``tasks`` on the task axes, every
    position on the others), for a NumPy array or a tensor alike."""
    grid = np.ix_(*[tasks if a in spec.axes else np.arange(n) for a, n in enumerate(value.shape)])
    if isinstance(value, Tensor):
        return tuple(torch.as_tensor(g, device=value.device) for g in grid)
    return grid


def _map_fields(value: Any, function: Any) -> Any:
    assert is_dataclass(value)
    return replace(value, **{f.name: function(getattr(value, f.name)) for f in fields(value)})
