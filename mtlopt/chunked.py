"""``G = J Jᵀ`` and the update ``wᵀJ`` holding at most k rows of ``J`` (``jacobian_rows=k``).

For a strategy whose weights come from ``G`` alone, on a step the Gramian engine does not take
(:mod:`mtlopt.autogram`: no shared linear layers, or the many-row regime where it does not pay),
the T × P ``J`` is the step's largest array. Here the tasks are taken k at a time: a block of k
rows ``J_a`` is formed by k backward passes, gives its diagonal block ``J_a J_aᵀ``, and every
later task's gradient is formed once more, alone, for its column ``J_a g_j``. That is
``T + Σ_a (T − end_a) ≈ T + T²/(2k)`` backward passes in place of T, with k + 1 gradients held
instead of T. The update is then one backward of ``Σ_i w_i L_i``: ``wᵀJ`` without ``J``. Memory
for time: it exists for the T × P that do not fit (docs/perf.md, the memory section, gives the
Jacobian path's fit and the largest T × P it holds).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .engine import TaskGradients, collect_task_gradients, flat_gradient, task_gradients
from .partition import Partition
from .wide import gram


@dataclass
class ChunkedRecorded:
    """What :func:`record_chunked` kept: ``G`` (float64), each task's reach and non-shared
    gradients, and the losses whose graph the update's backward still needs."""

    losses: Sequence[Tensor]
    partition: Partition
    trainable: Sequence[Tensor]
    gramian64: Tensor
    reached_by_task: list[tuple[bool, ...]]
    own_by_task: list[dict[int, Tensor]]
    sparse: bool
    _spent: bool = field(default=False, repr=False)

    def reached(self) -> list[tuple[bool, ...]]:
        return self.reached_by_task

    def own(self) -> list[dict[int, Tensor]]:
        return self.own_by_task

    def any_sparse(self) -> bool:
        return self.sparse

    def gramian(self, dtype: torch.dtype) -> Tensor:
        return self.gramian64.to(dtype)

    def combined(self, weights: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """The shared parameters and ``Σ_i w_i ∇L_i``: one backward of ``Σ_i w_i L_i`` (it frees
        the graph)."""
        shared = list(self.partition.shared)
        objective = sum(w * loss for w, loss in zip(weights.tolist(), self.losses, strict=True))
        grads = torch.autograd.grad(objective, shared, allow_unused=True)
        self._spent = True
        return shared, [
            torch.zeros_like(p) if g is None else g for p, g in zip(shared, grads, strict=True)
        ]

    def task_gradients(self, buffer: Tensor | None = None) -> TaskGradients:
        """The full ``J`` (a step the Gramian path does not take: a partition that changes, a
        sparse gradient): every task's gradient once more, while the graph is alive."""
        if self._spent:
            raise ValueError(
                "jacobian_rows= takes one backward per step: a second micro-batch needs the "
                "first one's J, which this mode does not keep; call step() after each backward "
                "or leave jacobian_rows unset for gradient accumulation"
            )
        return task_gradients(self.losses, self.trainable, self.partition, buffer)


def record_chunked(
    losses: Sequence[Tensor], trainable: Sequence[Tensor], partition: Partition, rows: int
) -> ChunkedRecorded:
    """``G`` of the shared parameters, ``rows`` rows of ``J`` at a time (module docstring); the
    graph is kept for the update's backward."""
    tasks = len(losses)
    shared = list(partition.shared)
    device = shared[0].device if shared else trainable[0].device
    gramian = torch.zeros(tasks, tasks, dtype=torch.float64, device=device)
    reached: list[tuple[bool, ...]] = []
    own: list[dict[int, Tensor]] = []
    sparse = False
    for start in range(0, tasks, rows):
        stop = min(start + rows, tasks)
        block = collect_task_gradients(
            (
                torch.autograd.grad(losses[k], trainable, retain_graph=True, allow_unused=True)
                for k in range(start, stop)
            ),
            trainable,
            partition,
            num_tasks=stop - start,
        )
        reached += block.reached
        own += block.own
        sparse = sparse or bool(block.sparse)
        rows_a = block.jacobian
        gramian[start:stop, start:stop] = gram(rows_a, dtype=torch.float64)
        for j in range(stop, tasks):
            grads = torch.autograd.grad(losses[j], shared, retain_graph=True, allow_unused=True)
            column = torch.cat(
                [flat_gradient(None if g is not None and g.is_sparse else g, p)
                 for g, p in zip(grads, shared, strict=True)]
            )
            del grads  # one task's gradient alive at a time, as its column
            products = gram(rows_a, column[None], dtype=torch.float64)[:, 0]
            gramian[start:stop, j] = products
            gramian[j, start:stop] = products
        del block, rows_a  # before the next block is formed: k rows alive, not 2k
    return ChunkedRecorded(losses, partition, trainable, gramian, reached, own, sparse)
