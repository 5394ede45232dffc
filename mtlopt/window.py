"""What one optimizer step accumulates over its micro-batches, and the small tensor helpers that
write gradients and step losses."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .stepinfo import StepInfo
from .strategies.base import Commit
from .tasks import StepTasks


@dataclass
class Window:
    """What has been accumulated since the last step: per-task gradients, losses, pending state."""

    present: np.ndarray | None = None
    """Tasks with a loss in any micro-batch of the window (increasing indices)."""
    jacobian: Tensor | None = None
    """Summed shared gradients, one row per task of ``present``."""
    losses: Tensor | None = None
    """Summed losses of every task (0 for a task not yet present), float64."""
    written: Tensor | None = None
    """The combined update written to the shared parameters' ``.grad`` so far (a P-vector)."""
    written_weights: Tensor | None = None
    """In place of ``written``: ``w`` of an update written as ``wᵀJ`` of the window's ``J`` (handed
    to ``.grad`` without a copy, or formed layer by layer by the Gramian engine), formed again if
    another micro-batch comes."""
    written_own: dict[tuple[int | None, int], Tensor] = field(default_factory=dict)
    """``(task, id(parameter)) →`` what was written for a strategy's own parameter (UW's)."""
    own_sums: dict[tuple[int, int], Tensor] = field(default_factory=dict)
    """``(task, id(parameter)) →`` summed gradient of a task's own parameter in the window."""
    written_sparse: dict[int, Tensor] = field(default_factory=dict)
    """``id(parameter) →`` what the window wrote to a sparse shared parameter's ``.grad``."""
    commit: Commit | None = None
    info: StepInfo | None = None
    skipped: bool = False
    engine: tuple[Any, Tensor] | None = None
    """What the Gramian engine kept of the window's micro-batch (:class:`mtlopt.autogram.Recorded`)
    and its task weights, in place of ``jacobian`` and ``written``."""
    marker: Tensor | None = None
    """A parameter whose ``.grad`` the window wrote: ``None`` there means someone zeroed it."""


def accumulate(
    params: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    fresh: bool = False,
    pieces: bool = False,
) -> None:
    """``p.grad += g`` for every pair, creating ``p.grad`` where it is ``None`` (a ``None``
    gradient leaves its parameter alone).

    ``fresh``: the gradients come straight from ``autograd.grad`` and nothing else keeps them, so
    one that is contiguous, not a view and not shared with another becomes ``p.grad`` itself, as
    ``loss.backward()`` would leave it (no copy). ``pieces``: the gradients are disjoint pieces of
    one new update (:func:`~mtlopt.engine.unflatten` of ``wᵀJ``) that nothing writes again; each
    contiguous one becomes ``p.grad`` as it is."""
    if any(g is None for g in grads):
        kept = [(p, g) for p, g in zip(params, grads, strict=True) if g is not None]
        params, grads = [p for p, _ in kept], [g for _, g in kept]
    if any(g.is_sparse for g in grads):
        for p, g in zip(params, grads, strict=True):
            if g.is_sparse:
                p.grad = g.detach().clone() if p.grad is None else (p.grad + g).coalesce()
        kept = [(p, g) for p, g in zip(params, grads, strict=True) if not g.is_sparse]
        params, grads = [p for p, _ in kept], [g for _, g in kept]
    existing = [(p, g) for p, g in zip(params, grads, strict=True) if p.grad is not None]
    if existing:
        torch._foreach_add_(
            [p.grad for p, _ in existing], [g.to(p.grad.dtype) for p, g in existing]
        )
    shared: set[int] = set()
    if fresh:
        seen: set[int] = set()
        for g in grads:
            ptr = g.untyped_storage().data_ptr()
            (shared if ptr in seen else seen).add(ptr)
    for p, g in zip(params, grads, strict=True):
        if p.grad is None:
            if g.dtype == p.dtype and g.is_contiguous() and (
                pieces
                or (fresh and g._base is None and g.untyped_storage().data_ptr() not in shared)
            ):
                p.grad = g.detach()
                continue
            # Own copy: autograd may hand one tensor to several parameters (an addition passes its
            # incoming gradient to both operands) or a view of the combined update; adding into
            # such a .grad in place would double-count or rewrite the wrapper's own record.
            p.grad = g.detach().to(p.dtype).clone()


def add_to_sum(sums: dict[tuple[int, int], Tensor], key: tuple[int, int], grad: Tensor) -> None:
    sums[key] = grad if key not in sums else sums[key] + grad


def with_values(losses: Sequence[Tensor], values: Tensor) -> list[Tensor]:
    """Each loss with its value replaced by ``values[i]`` and its gradient unchanged.

    Strategies then weigh by the step's losses (accumulated over micro-batches, averaged over
    ranks) while the gradient flows through this micro-batch's own losses.
    """
    return [
        loss + (value.to(loss) - loss.detach()) for loss, value in zip(losses, values, strict=True)
    ]


def detach_losses(losses: Sequence[Tensor]) -> Tensor:
    """The task losses as one float64 vector, on the first loss's device."""
    device = losses[0].device
    return torch.stack([t.detach().reshape(()).to(device) for t in losses]).to(torch.float64)


def window_losses(window: Window, step: StepTasks, detached: Tensor) -> Tensor:
    """Every task's loss summed over the window's micro-batches, this one included (0 where a
    task has not been present)."""
    if window.losses is None and step.all_present:
        return detached
    total = (
        torch.zeros(len(step.names), dtype=torch.float64, device=detached.device)
        if window.losses is None
        else window.losses.clone()
    )
    total[torch.as_tensor(step.present, device=detached.device)] += detached
    return total


def union(a: np.ndarray | None, b: np.ndarray) -> np.ndarray:
    return b if a is None or np.array_equal(a, b) else np.union1d(a, b)


def add_rows(
    rows: Tensor | None, rows_tasks: np.ndarray | None, new: Tensor, new_tasks: np.ndarray,
    tasks: np.ndarray,
) -> Tensor:
    """``rows`` (one per task of ``rows_tasks``) plus ``new`` (one per task of ``new_tasks``), as
    one row per task of ``tasks``."""
    if rows is None:
        return new
    if np.array_equal(rows_tasks, new_tasks):
        return rows + new
    out = new.new_zeros(len(tasks), new.shape[1])
    out[torch.as_tensor(np.searchsorted(tasks, rows_tasks))] += rows
    out[torch.as_tensor(np.searchsorted(tasks, new_tasks))] += new
    return out
