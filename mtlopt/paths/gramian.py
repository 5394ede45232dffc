"""The Gramian engine's backward path (:mod:`mtlopt.autogram`): Gramian strategies get ``G``
without ``J``, and the update is formed once per layer.

It takes a step only where its result is the Jacobian path's: a strategy whose combination is a
function of ``G`` (:class:`~mtlopt.strategies.base.GramianStrategy`, not overriding ``combine``),
no torch.distributed, no sparse gradient, no partition change, and the first micro-batch of a
step. Elsewhere the same backward passes give the full ``J``
(:meth:`~mtlopt.autogram.Recorded.task_gradients`) to the Jacobian path; a second micro-batch
forms the first's rows of ``J`` from what the engine kept.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..autogram import (
    BufferPool,
    Recorded,
    engine_pays,
    engine_serves,
    find_layers,
    record_gradients,
)
from ..chunked import ChunkedRecorded, record_chunked
from ..engine import _real_dtype
from ..finite import check_tasks, finite_tensors
from ..partition import Partition
from ..stepinfo import StepInfo
from ..strategies.base import host_gramian
from ..tasks import StepTasks
from ..window import accumulate, window_losses
from .base import PathBase

ENGINES = ("auto", "jacobian", "gramian")
"""``MTLOptimizer(engine=...)``: the engine where it serves the step, never, or required."""


ENGINE_RECHECK = 64
"""``engine="auto"``: after a step where the engine does not pay, the next this many updates with
the same number of tasks take the Jacobian path without walking the graph again (the walk costs
~0.3 ms on a tiny model). Either path gives the same result; only the speed depends on it."""


class GramianEnginePath(PathBase):
    """The engine's part of :class:`~mtlopt.MTLOptimizer`."""

    engine: str
    _updates: int
    _engine_declined: tuple[int, int] | None
    """``(tasks, update)``: ``engine="auto"`` declined at this task count until that update."""
    _engine_pool: BufferPool
    _jacobian_rows: int | None

    def _engine_gradients(
        self, losses: list[Tensor], trainable: list[Tensor], partition: Partition
    ) -> Recorded | ChunkedRecorded | None:
        """The engine's backward passes, where it finds shared linear layers in these losses'
        graph; elsewhere, with ``jacobian_rows=k`` and more than k tasks, ``G`` k rows of ``J``
        at a time (:mod:`mtlopt.chunked`)."""
        if self._replicas is not None or not engine_serves(self._combiner):
            return None
        recorded = self._linear_layers_gradients(losses, trainable, partition)
        rows = self._jacobian_rows
        if recorded is None and rows is not None and len(losses) > rows:
            return record_chunked(losses, trainable, partition, rows)
        return recorded

    def _linear_layers_gradients(
        self, losses: list[Tensor], trainable: list[Tensor], partition: Partition
    ) -> Recorded | None:
        if self.engine == "jacobian":
            return None
        auto = self.engine == "auto"
        declined = self._engine_declined
        if auto and declined is not None and declined[0] == len(losses) and declined[1] > self._updates:
            return None
        layers = find_layers(losses, partition)
        if not layers or (auto and not engine_pays(layers, len(losses))):
            if auto:
                self._engine_declined = (len(losses), self._updates + ENGINE_RECHECK)
            return None
        window = self._window
        fresh = window.engine is None and window.jacobian is None
        return record_gradients(
            losses, trainable, partition, layers, self._engine_pool if fresh else None
        )

    def _engine_takes_step(self, step: StepTasks, recorded: Recorded | ChunkedRecorded) -> bool:
        """Whether the engine's combination is the Jacobian path's for this step (else the full
        ``J`` is formed from the same backward passes)."""
        assert self._reach is not None and self._partition_key is not None
        window = self._window
        if window.jacobian is not None or window.engine is not None:
            return False
        if recorded.any_sparse():
            return False
        key = self._partition_key
        return all(
            self._reach.known(int(task), key, reached)
            for task, reached in zip(step.present, recorded.reached(), strict=True)
        )

    def _backward_gramian(
        self, step: StepTasks, recorded: Recorded | ChunkedRecorded, detached: Tensor, scale: float
    ) -> StepInfo:
        """The engine's step. Under a GradScaler the recorded gradients are those of the scaled
        losses: ``G`` is divided by the scale squared and the update written as it comes (the
        scale times the update, as ``.grad`` holds until ``scaler.unscale_``), both exact since
        the scales are powers of two."""
        assert engine_serves(self._combiner)
        combiner: Any = self._combiner  # a GramianStrategy or a wrapper of one (CR-MOGM)
        window = self._window
        partition = recorded.partition
        self._check_reached(step, recorded.reached())
        own = recorded.own()
        specific = [
            [own[k].get(id(p)) for p in partition.specific[task]]
            for k, task in enumerate(step.present)
        ]
        dtype = _real_dtype(partition.shared)
        precision = torch.float64 if combiner.float64_gramian else dtype
        gramian = _host(recorded.gramian(precision), scale)
        diagonal = gramian.diagonal()
        if not (np.all(np.isfinite(diagonal)) and np.all(diagonal > 0)):
            # Overflow or underflow of squares in J's dtype: the exact account, in float64.
            gramian = _host(recorded.gramian(torch.float64), scale)
            diagonal = gramian.diagonal()
        for name, value in zip(step.present_names, diagonal, strict=True):
            if not np.isfinite(value):
                return self._bad_gradient(step, detached, f"non-finite gradient for task {name!r}")
        checks = check_tasks(torch.zeros(len(step.present), 0), specific, diagonal)
        for name, check in zip(step.present_names, checks, strict=True):
            if not check.finite:
                return self._bad_gradient(step, detached, f"non-finite gradient for task {name!r}")
        self._warn_zero_tasks(step, checks)

        present = step.present
        losses_sum = window_losses(window, step, detached)
        restriction = None if len(present) == len(step.names) else present
        self._combiner.observe_columns(partition.shared, self.param_groups)
        device = partition.shared[0].device
        try:
            with self._combiner.restricted_to(restriction):
                combined = combiner.combine_gramian(
                    gramian, losses_sum[present].to(device), dtype, partition.num_shared, device
                )
        except FloatingPointError as error:
            return self._nonfinite(step, detached, str(error))
        assert combined.weights is not None
        params, grads = recorded.combined(combined.weights)
        if not finite_tensors(grads):
            return self._nonfinite(
                step, detached, f"{self._combiner.info.name} produced a non-finite update"
            )
        accumulate(params, grads, fresh=True)  # each a new product, kept nowhere else
        self._write_own(step, partition, specific, combined, present, scale)
        window.present, window.losses = present, losses_sum
        window.engine = (recorded, combined.weights)
        window.commit = self._combiner.commit_restricted(restriction, combined.commit)
        window.marker = partition.shared[0]
        window.info = self._gradient_info(step, losses_sum, present, None, combined)
        window.info.engine = "chunked" if isinstance(recorded, ChunkedRecorded) else "gramian"
        return window.info

    def _unfold_engine_window(self) -> None:
        """A second micro-batch after the engine's: the first's rows of ``J`` formed from what the
        engine kept, and the weights of the update it wrote (formed by the Jacobian path)."""
        window = self._window
        assert window.engine is not None
        recorded, weights = window.engine
        jacobian = recorded.task_gradients().jacobian  # before any change: it may refuse
        window.engine = None
        window.jacobian, window.written_weights = jacobian, weights


def _host(gramian: Tensor, scale: float = 1.0) -> np.ndarray:
    """:func:`host_gramian` of the scaled losses' Gramian, unscaled (exact: a power of two)."""
    array = host_gramian(gramian)
    return array if scale == 1.0 else array / (scale * scale)


