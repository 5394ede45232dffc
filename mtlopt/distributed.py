"""Data parallelism with ``torch.distributed``: per-task gradients averaged across ranks.

:class:`Replicas` is what :class:`~mtlopt.MTLOptimizer` uses when a process group is active: every
backward averages the per-task gradients (the T×P matrix of the shared parameters, the task-specific
gradients and the task losses) across ranks with **one** ``all_reduce`` on a flat buffer, before the
strategy combines them. Every rank then holds the same inputs, so after the strategy's state has
been broadcast from rank 0 once, stateful and random strategies stay identical on every rank, and a
run on N ranks equals a single-process run on the union of the N batches (for losses that are means
over equal per-rank batches).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

if TYPE_CHECKING:
    from .strategies.base import Strategy


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
        out: list[Tensor | None] = [None] * len(tensors)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(tensors):
            by_dtype.setdefault(t.dtype, []).append(i)
        for indices in by_dtype.values():
            flat = torch.cat([tensors[i].reshape(-1) for i in indices])
            dist.all_reduce(flat, group=self.group)
            flat.div_(self.size)
            for i, piece in zip(
                indices, flat.split([tensors[i].numel() for i in indices]), strict=True
            ):
                out[i] = piece.view_as(tensors[i])
        return out  # type: ignore[return-value]

    def broadcast_strategy(self, strategy: Strategy) -> None:
        """Give every rank rank 0's strategy state and strategy parameters (once, at the start)."""
        payload = [strategy.state_dict()]
        dist.broadcast_object_list(payload, src=self.source, group=self.group)
        strategy.load_state_dict(payload[0])
        for parameter in strategy.parameters():
            dist.broadcast(parameter.data, src=self.source, group=self.group)
