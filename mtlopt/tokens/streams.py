"""Task streams after a DTME expansion, and ``task_view`` for the heads.

From the first modified block on, activations carry K task streams stacked task-major along the
batch axis: rows ``[i·B, (i+1)·B)`` belong to task i. The branching block records B for the
current forward pass; :func:`task_view` uses it to cut out one task's stream, and returns any other
tensor unchanged, so heads written once work before and after the expansion.
"""

from __future__ import annotations

import threading

from torch import Tensor


class _StreamContext(threading.local):
    def __init__(self) -> None:
        self.num_tasks = 1
        self.batch = 0
        self.branched = False
        self.views = 0

    def start(self, num_tasks: int, batch: int) -> None:
        self.num_tasks, self.batch, self.branched, self.views = num_tasks, batch, True, 0

    def reset(self) -> None:
        self.num_tasks, self.batch, self.branched, self.views = 1, 0, False, 0


STREAMS = _StreamContext()


def task_view(x: Tensor, task: int) -> Tensor:
    """Task ``task``'s stream of an activation ``x`` (or ``x`` itself if it was computed before any
    branch, i.e. its batch is not K·B for the current forward pass)."""
    if STREAMS.branched and x.shape[0] == STREAMS.num_tasks * STREAMS.batch:
        if not 0 <= task < STREAMS.num_tasks:
            raise IndexError(f"task {task} out of range for {STREAMS.num_tasks} streams")
        STREAMS.views += 1
        return x[task * STREAMS.batch : (task + 1) * STREAMS.batch]
    return x


def stream_count() -> int:
    """Number of task streams in the current forward pass (1 before any branch)."""
    return STREAMS.num_tasks if STREAMS.branched else 1
