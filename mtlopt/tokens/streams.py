"""Task streams after a DTME expansion, ``task_view`` for the heads, and single-task inference.

From the first modified block on, activations carry K task streams stacked task-major along the
batch axis: rows ``[i·B, (i+1)·B)`` belong to task i (DTME-MTL, Jeong & Yoon 2025, Sec. 3.4: stream
i carries task i's tokens). The branching block records B for the current forward pass;
:func:`task_view` uses it to cut out one task's stream and returns activations computed before the
branch (B rows, shared by every task) unchanged, so heads written once work before and after the
expansion. Inside :func:`single_task` the blocks run task i's stream only.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor


class _StreamContext(threading.local):
    def __init__(self) -> None:
        self.num_tasks = 1
        self.batch = 0
        self.branched = False
        self.views = 0
        self.only: int | None = None
        self.scoped = False

    def start(self, num_tasks: int, batch: int) -> None:
        self.num_tasks, self.batch, self.branched, self.views = num_tasks, batch, True, 0

    def reset(self, scoped: bool | None = None) -> None:
        """Forget the current pass's streams; ``scoped``: whether a model's forward pass (DTME's
        ``model=``) now encloses them (default: unchanged)."""
        self.num_tasks, self.batch, self.branched, self.views = 1, 0, False, 0
        if scoped is not None:
            self.scoped = scoped


STREAMS = _StreamContext()


def task_view(x: Tensor, task: int) -> Tensor:
    """Task ``task``'s stream of an activation ``x``: rows ``[task·B, (task+1)·B)`` of a K·B-row
    activation computed after the branch, ``x`` itself for one computed before it (B rows).

    Inside :func:`single_task` (i) the blocks ran stream i only: ``task_view(x, i)`` is ``x`` and
    any other task's view is filled with NaN, so that an output read for another task cannot pass
    for a real one. Inside the forward pass of the model given to DTME (``model=``), an activation
    with neither B nor K·B rows is an error (it is not one of this pass's activations).
    """
    if not STREAMS.branched:
        return x
    k, batch = STREAMS.num_tasks, STREAMS.batch
    if STREAMS.only is not None:
        STREAMS.views += 1
        if x.shape[0] != batch:
            raise ValueError(f"task_view: {x.shape[0]} rows, this forward pass has batch {batch}")
        return x if task == STREAMS.only else torch.full_like(x, float("nan"))
    if not 0 <= task < k:
        raise IndexError(f"task {task} out of range for {k} streams")
    if x.shape[0] == k * batch:
        STREAMS.views += 1
        return x[task * batch : (task + 1) * batch]
    if x.shape[0] == batch or not STREAMS.scoped:
        return x
    raise ValueError(
        f"task_view got {x.shape[0]} rows in a forward pass with {k} task streams of batch {batch}: "
        f"activations before the DTME branch have {batch} rows, after it {k * batch}"
    )


def stream_count() -> int:
    """Number of task streams in the current forward pass (1 before any branch)."""
    return STREAMS.num_tasks if STREAMS.branched else 1


def is_streamed(x: Tensor) -> bool:
    """Whether ``x`` (an activation of the current forward pass) holds the K task streams, i.e.
    was computed after the DTME branch; hidden states from earlier blocks do not."""
    return (
        STREAMS.branched
        and STREAMS.num_tasks > 1
        and x.shape[0] == STREAMS.num_tasks * STREAMS.batch
    )


@contextmanager
def single_task(task: int) -> Iterator[None]:
    """Inference for one task: the expanded blocks run task ``task``'s stream only (its modulation
    and its tokens), at about the cost of the model before the expansion. Other tasks' views are
    NaN (see :func:`task_view`)."""
    if task < 0:
        raise IndexError(f"task must be non-negative, got {task}")
    previous = STREAMS.only
    STREAMS.only = task
    try:
        yield
    finally:
        STREAMS.only = previous
