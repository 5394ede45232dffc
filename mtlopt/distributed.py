"""Data parallelism with ``torch.distributed``: per-task gradients averaged across ranks.

:class:`Replicas` is what :class:`~mtlopt.MTLOptimizer` uses when a process group is active: every
backward averages the per-task gradients (the T×P matrix of the shared parameters, the task-specific
gradients and the task losses) across ranks with **one** ``all_reduce`` on a flat buffer, before the
strategy combines them. Every rank then holds the same inputs, so after the strategy's state has
been broadcast from rank 0 once, stateful and random strategies stay identical on every rank, and a
run on N ranks equals a single-process run on the union of the N batches (for losses that are means
over equal per-rank batches).

Before that, :meth:`Replicas.agree` makes the ranks agree on what they are about to average, with
two small collectives: whether every rank's input was valid (a rank whose input was refused makes
every rank raise, so none is left waiting in a collective), which tasks each rank has (a task
present on some ranks only is averaged over those ranks), and which parameters each task reached
(so that every rank lays out the same ``J`` and the same gradients).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

if TYPE_CHECKING:
    from .strategies.base import Strategy


class ReplicaError(RuntimeError):
    """Another rank refused its input for this step: every rank raises, none changed anything."""


@dataclass
class Agreement:
    """What every rank has for this backward."""

    counts: Tensor
    """Per task: how many ranks have a loss for it (int64)."""
    losses: Tensor
    """Per task: the mean of its loss over the ranks that have it (float64; 0 where none)."""
    reach: Tensor
    """Rows × trainable parameters: reached on some rank (bool)."""


class Replicas:
    """The ranks of one process group training copies of the same model."""

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.source = dist.get_global_rank(group, 0) if group is not None else 0

    @classmethod
    def detect(cls, group: Any = None) -> Replicas | None:
        """The replicas of ``group`` (the default group when ``None``) if there are several."""
        if not (dist.is_available() and dist.is_initialized()):
            if group is not None:
                raise RuntimeError(
                    "a process_group was given but torch.distributed is not initialised"
                )
            return None
        replicas = cls(group)
        return replicas if replicas.size > 1 else None

    def mean(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """The average over ranks of each tensor, with one ``all_reduce`` per dtype (usually one)."""
        return self._reduce(tensors, divide=True)

    def _reduce(self, tensors: Sequence[Tensor], divide: bool) -> list[Tensor]:
        out: list[Tensor | None] = [None] * len(tensors)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(tensors):
            by_dtype.setdefault(t.dtype, []).append(i)
        for indices in by_dtype.values():
            flat = torch.cat([tensors[i].reshape(-1) for i in indices])
            dist.all_reduce(flat, group=self.group)
            if divide:
                flat.div_(self.size)
            for i, piece in zip(
                indices, flat.split([tensors[i].numel() for i in indices]), strict=True
            ):
                out[i] = piece.view_as(tensors[i])
        return out  # type: ignore[return-value]

    def agree(
        self,
        *,
        failed: bool,
        num_tasks: int,
        present: np.ndarray | None = None,
        losses: Tensor | None = None,
        reach: Tensor | None = None,
    ) -> Agreement:
        """One collective checks that every rank's input was valid and that the ranks have the
        same task count and parameter count; a second sums which tasks each rank has and what
        they reached (``reach``: rows × parameters). Raises :class:`ReplicaError` on every rank
        that did not fail itself when one did (the failing rank raises its own error)."""
        rows, params = (0, 0) if reach is None else tuple(reach.shape)
        shape = [num_tasks, rows, params]
        header = torch.tensor(
            [int(failed), *shape, *(v * v for v in shape)], dtype=torch.float64
        )
        dist.all_reduce(header, group=self.group)
        failures = int(header[0])
        if failures:
            if failed:
                empty = torch.zeros(0)
                return Agreement(empty.long(), empty.double(), torch.zeros(0, 0, dtype=bool))
            raise ReplicaError(
                f"{failures} other rank(s) refused their input for this step (see their error); "
                "every rank stops here, nothing was changed"
            )
        sums, squares = header[1:4], header[4:7]
        if not torch.equal(sums * sums, squares * self.size):
            raise ReplicaError(
                "the ranks disagree on the number of tasks or of trainable parameters: pass the "
                "same tasks=[...] to MTLOptimizer on every rank and train the same parameters"
            )
        payload = torch.zeros(2 * num_tasks + rows * params, dtype=torch.float64)
        if present is not None:
            index = torch.as_tensor(present)
            payload[index] = 1.0
            if losses is not None:
                payload[num_tasks + index] = losses.detach().double().cpu()
        if reach is not None:
            payload[2 * num_tasks :] = reach.reshape(-1).to(torch.float64)
        dist.all_reduce(payload, group=self.group)
        counts = payload[:num_tasks].round().long()
        mean_losses = payload[num_tasks : 2 * num_tasks] / counts.clamp_min(1)
        return Agreement(counts, mean_losses, payload[2 * num_tasks :].view(rows, params) > 0)

    def union(self, reached: Tensor) -> Tensor:
        """Where any rank has ``reached`` true (one ``all_reduce``)."""
        flags = reached.to(torch.float64)
        dist.all_reduce(flags, group=self.group)
        return flags > 0

    def sum(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """The sum over ranks of each tensor, with one ``all_reduce`` per dtype (usually one)."""
        return self._reduce(tensors, divide=False)

    def broadcast_strategy(self, strategy: Strategy) -> None:
        """Give every rank rank 0's strategy state and strategy parameters (once, at the start)."""
        payload = [strategy.state_dict()]
        dist.broadcast_object_list(payload, src=self.source, group=self.group)
        strategy.load_state_dict(payload[0])
        for parameter in strategy.parameters():
            dist.broadcast(parameter.data, src=self.source, group=self.group)
