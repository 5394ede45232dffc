"""The backward path of gradient strategies: one ``autograd.grad`` per task into ``J``, the strategy's
combination of its rows written to the shared parameters."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import Tensor

from ..autogram import engine_serves
from ..engine import (
    TaskGradients,
    flat_gradient,
    rebuild_jacobian,
    reusable_buffer,
    task_gradients,
    unflatten,
)
from ..finite import all_finite, check_tasks, combination_bounded, finite_tensors
from ..partition import Partition, column_map
from ..stepinfo import StepInfo
from ..strategies.base import (
    Combined,
    GradientStrategy,
    GramianStrategy,
    TokenStrategy,
    gramian_of,
    known_gramian,
)
from ..tasks import StepTasks
from ..window import accumulate, add_rows, add_to_sum, union, window_losses
from .gramian import GramianEnginePath


class JacobianPath(GramianEnginePath):
    """Gradient strategies: per-task gradients into the rows of ``J`` (following what each task
    reaches), the strategy's combination of the present rows written to the shared parameters, and
    each task's own gradients to its own parameters."""

    _jacobian_buffer: Tensor | None = None
    """``J``'s memory, written again on the next step that starts a window."""

    def _backward_jacobian(
        self, step: StepTasks, losses: list[Tensor], detached: Tensor, scale: float
    ) -> StepInfo:
        assert isinstance(self._combiner, GradientStrategy)
        keep_graph = self._combiner.adds_head_gradients
        if keep_graph and self._replicas is not None:
            raise NotImplementedError(
                f"{self._combiner.info.name} under torch.distributed is not supported: its extra "
                "head gradients are taken from each rank's own graph and would not be averaged "
                "across ranks; nothing was changed"
            )
        window = self._window
        if window.engine is not None:
            self._unfold_engine_window()
        if window.written_weights is not None:  # the update written as wᵀJ, formed again
            assert window.jacobian is not None
            window.written = window.written_weights.to(window.jacobian) @ window.jacobian
            window.written_weights = None
        trainable = self._trainable()
        partition = self._partition_for(step, losses, trainable)
        # J's memory from the last step, unless this window already holds rows (accumulation).
        buffer = self._jacobian_buffer if window.jacobian is None else None
        self._jacobian_buffer = None
        grads = None
        if isinstance(self.strategy, TokenStrategy):  # DTME's task streams: one backward for all
            grads = self.strategy.task_gradients(losses, trainable, partition)
        else:
            recorded = self._engine_gradients(losses, trainable, partition)
            if recorded is not None:
                if self._engine_takes_step(step, recorded):
                    return self._backward_gramian(step, recorded, detached, scale)
                grads = recorded.task_gradients(buffer)
        if grads is None:
            grads = task_gradients(losses, trainable, partition, buffer, retain_graph=keep_graph)
        self._check_reached(step, grads.reached)
        counts = None
        if self._replicas is not None:
            step, grads, detached, counts = self._agree_gradients(step, grads, detached)
        partition, jacobian = self._follow_reach(step, grads, trainable, partition)
        specific = self._specific_gradients(step, grads, partition)
        if scale != 1.0:
            jacobian.mul_(1.0 / scale)  # exact: GradScaler's scales are powers of two
        if counts is not None:
            jacobian, specific = self._average(
                jacobian, specific, counts, [partition.specific[t] for t in step.present]
            )
            if not all_finite(detached):
                return self._nonfinite_loss(step, detached)
        sparse_grads = [[own.get(i) for i in grads.sparse] for own in grads.own]  # by id
        checked = [[*s, *g] for s, g in zip(specific, sparse_grads, strict=True)]
        # G = J Jᵀ once, for the strategy, the diagnostics and the finiteness check (its diagonal
        # holds the rows' squared norms).
        gramian = None
        if jacobian.shape[1] > 0 and (
            self.diagnostics or isinstance(self._combiner, GramianStrategy)
        ):
            gramian = gramian_of(jacobian, getattr(self._combiner, "float64_gramian", False))
        checks = check_tasks(jacobian, checked, None if gramian is None else gramian.diagonal())
        for name, check in zip(step.present_names, checks, strict=True):
            if not check.finite:
                return self._bad_gradient(step, detached, f"non-finite gradient for task {name!r}")
        self._warn_zero_tasks(step, checks)

        present = union(window.present, step.present)
        rows = jacobian
        jacobian = add_rows(window.jacobian, window.present, jacobian, step.present, present)
        known = (
            known_gramian(jacobian, gramian)
            if gramian is not None and jacobian is rows
            else contextlib.nullcontext()
        )
        with known:
            return self._combine_and_write(
                step, grads, partition, specific, detached, scale, present, jacobian
            )

    def _combine_and_write(
        self,
        step: StepTasks,
        grads: TaskGradients,
        partition: Partition,
        specific: list[list[Tensor | None]],
        detached: Tensor,
        scale: float,
        present: np.ndarray,
        jacobian: Tensor,
    ) -> StepInfo:
        assert isinstance(self._combiner, GradientStrategy)
        window = self._window
        losses_sum = window_losses(window, step, detached)
        restriction = None if len(present) == len(step.names) else present
        self._combiner.observe_columns(partition.shared, self.param_groups)
        try:
            with self._combiner.restricted_to(restriction):
                combined = self._combiner.combine(
                    jacobian, losses_sum[present].to(jacobian.device)
                )
        except FloatingPointError as error:
            return self._nonfinite(step, detached, str(error))
        bounded = (
            engine_serves(self._combiner)  # direction = wᵀJ by construction, G from this J
            and combined.weights is not None
            and combined.gramian is not None
            and combination_bounded(combined.weights, combined.gramian, jacobian.dtype)
        )
        if not bounded and not check_tasks(combined.direction[None], [[]])[0].finite:
            return self._nonfinite(
                step, detached, f"{self._combiner.info.name} produced a non-finite update"
            )
        extras = None
        if combined.head_extra is not None:
            extras = self._head_extras(step, partition, specific, combined, scale)
            if not finite_tensors([g for task in extras for g in task]):
                return self._nonfinite(
                    step, detached, f"{self._combiner.info.name} produced a non-finite head gradient"
                )

        delta = (
            combined.direction if window.written is None else combined.direction - window.written
        )
        if scale != 1.0:
            delta = delta * scale  # .grad holds scaled gradients until scaler.unscale_
        # A new update is handed to .grad as it is: a difference or product formed here, or a
        # Gramian strategy's wᵀJ, which the window then keeps as w (a strategy's own direction may
        # be its state, and .grad may be clipped in place between micro-batches: both copied).
        handed = delta is combined.direction and engine_serves(self._combiner)
        accumulate(
            partition.shared,
            unflatten(delta, partition.shared),
            pieces=handed or delta is not combined.direction,
        )
        self._write_own(step, partition, specific, combined, present, scale, extras)
        if partition.sparse:
            self._write_sparse(step, grads, partition, present, combined, scale)
        window.present, window.jacobian, window.losses = present, jacobian, losses_sum
        window.written = None if handed else combined.direction
        window.written_weights = combined.weights if handed else None
        window.commit = self._combiner.commit_restricted(restriction, combined.commit)
        window.marker = partition.shared[0] if partition.shared else None
        window.info = self._gradient_info(step, losses_sum, present, jacobian, combined)
        window.info.engine = "jacobian"
        self._jacobian_buffer = reusable_buffer(jacobian)
        return window.info

    def _head_extras(
        self,
        step: StepTasks,
        partition: Partition,
        specific: list[list[Tensor | None]],
        combined: Combined,
        scale: float,
    ) -> list[list[Tensor | None]]:
        """The strategy's extra gradients of each present task's own parameters
        (:attr:`Combined.head_extra`), given the task's unscaled raw gradients of them."""
        assert combined.head_extra is not None
        extras = []
        for k, task in enumerate(step.present):
            raw = [g if g is None or scale == 1.0 else g / scale for g in specific[k]]
            extras.append(list(combined.head_extra(int(task), partition.specific[task], raw)))
        return extras

    def _write_sparse(
        self,
        step: StepTasks,
        grads: TaskGradients,
        partition: Partition,
        present: np.ndarray,
        combined: Combined,
        scale: float,
    ) -> None:
        """Shared parameters with sparse gradients get ``Σ_i w_i g_i`` with the strategy's task
        weights (the plain sum for strategies without weights), kept sparse."""
        window = self._window
        for k, task in enumerate(step.present):
            for p in partition.sparse:
                g = grads.own[k].get(id(p))
                if g is not None:
                    add_to_sum(window.own_sums, (int(task), id(p)), g / scale)
        weights = combined.weights
        for p in partition.sparse:
            terms = [
                (window.own_sums[(int(task), id(p))], r)
                for r, task in enumerate(present)
                if (int(task), id(p)) in window.own_sums
            ]
            if not terms:
                continue
            target = sum(
                (g * (1.0 if weights is None else float(weights[r])) for g, r in terms),
                start=torch.zeros_like(terms[0][0]),
            ).coalesce()
            previous = window.written_sparse.get(id(p))
            window.written_sparse[id(p)] = target
            delta = target if previous is None else (target - previous).coalesce()
            accumulate([p], [delta * scale if scale != 1.0 else delta])

    def _specific_gradients(
        self, step: StepTasks, grads: TaskGradients, partition: Partition
    ) -> list[list[Tensor | None]]:
        """Each present task's gradients of its own parameters (``None`` for one it reached on an
        earlier step only)."""
        return [
            [grads.own[k].get(id(p)) for p in partition.specific[task]]
            for k, task in enumerate(step.present)
        ]

    def _agree_gradients(
        self, step: StepTasks, grads: TaskGradients, detached: Tensor
    ) -> tuple[StepTasks, TaskGradients, Tensor, Tensor]:
        """Gradient path under torch.distributed: every rank lays out the rows of the tasks any
        rank has (zeros where it has none) and records what any rank reached."""
        total = len(step.names)
        reach = torch.zeros(total, len(grads.reached[0]) if grads.reached else 0, dtype=torch.bool)
        if grads.reached:
            reach[torch.as_tensor(step.present)] = torch.tensor(grads.reached)
        agreement = self._agreement(step, detached, reach)
        union = torch.nonzero(agreement.counts).reshape(-1).numpy()
        rows = torch.searchsorted(torch.as_tensor(union), torch.as_tensor(step.present))
        jacobian = grads.jacobian.new_zeros(len(union), grads.jacobian.shape[1])
        jacobian[rows] = grads.jacobian
        own: list[dict[int, Tensor]] = [{} for _ in union]
        for k, r in enumerate(rows.tolist()):
            own[r] = grads.own[k]
        reached = [tuple(agreement.reach[t].tolist()) for t in union.tolist()]
        placeholder = step.losses[0].detach()
        united = StepTasks(step.names, union, tuple(placeholder for _ in union))
        losses = agreement.losses[union].to(detached.device)
        return united, TaskGradients(jacobian, own, reached, grads.sparse), losses, (
            agreement.counts[union]
        )

    def _follow_reach(
        self, step: StepTasks, grads: TaskGradients, trainable: list[Tensor], partition: Partition
    ) -> tuple[Partition, Tensor]:
        """Record what each task reached; if that makes the partition change, rebuild ``J`` (and
        the window's, and the strategy's per-column state) under the new one."""
        assert self._reach is not None
        sparse = grads.sparse - self._sparse_ids
        if sparse and self._replicas is not None:
            raise NotImplementedError(
                "shared parameters with sparse gradients (nn.Embedding(sparse=True)) under "
                "torch.distributed are not supported: use dense embeddings there"
            )
        key = self._partition_key  # _partition_for has just set it for these parameters
        assert key is not None
        if not sparse and all(
            self._reach.known(int(task), key, reached)
            for task, reached in zip(step.present, grads.reached, strict=True)
        ):
            return partition, grads.jacobian
        self._sparse_ids |= sparse
        changed = bool(sparse)
        reach = self._reach.copy()
        for k, task in enumerate(step.present):
            changed |= reach.add(int(task), trainable, grads.reached[k])
        if not changed:
            self._reach = reach
            return partition, grads.jacobian
        new = self._new_partition(step, reach, trainable)
        same = [id(p) for p in new.shared] == [id(p) for p in partition.shared] and [
            [id(p) for p in s] for s in new.specific
        ] == [[id(p) for p in s] for s in partition.specific]
        self._reach = reach
        if same:
            return partition, grads.jacobian
        jacobian = rebuild_jacobian(grads, partition, new)
        self._adopt_partition(partition, new, trainable)
        return new, jacobian

    def _adopt_partition(self, old: Partition, new: Partition, trainable: list[Tensor]) -> None:
        """Make ``new`` current: the window's rows and written update, and the strategy's state
        indexed by column, follow each parameter to its new columns."""
        assert isinstance(self._combiner, GradientStrategy)
        mapping = column_map(old, new)
        self._combiner.remap_columns(mapping)
        window = self._window
        if window.jacobian is not None:
            before = old.column_ranges()
            keep = mapping >= 0
            rows = window.jacobian.new_zeros(window.jacobian.shape[0], new.num_shared)
            rows[:, keep] = window.jacobian[:, mapping[keep].to(window.jacobian.device)]
            written = rows.new_zeros(new.num_shared)
            if window.written is not None:
                written[keep] = window.written[mapping[keep].to(written.device)]
            after = new.column_ranges()
            for p in new.shared:
                if id(p) in before:
                    continue
                start, stop = after[id(p)]
                for r, task in enumerate(window.present):  # type: ignore[arg-type]
                    g = window.own_sums.get((int(task), id(p)))
                    if g is not None:
                        flat = flat_gradient(g, p)
                        rows[r, start:stop] = flat
                        written[start:stop] += flat
            window.jacobian, window.written = rows, written
        self._partition = new
        self._partition_key = self._key_of(trainable)

    def _average(
        self,
        jacobian: Tensor,
        specific: list[list[Tensor | None]],
        counts: Tensor,
        params: list[list[Tensor]],
    ) -> tuple[Tensor, list[list[Tensor | None]]]:
        """Each task's gradients averaged over the ranks that have the task, in one collective
        (a gradient a rank does not have counts as zero there)."""
        assert self._replicas is not None
        flat = [
            torch.zeros_like(p) if g is None else g
            for grads, ps in zip(specific, params, strict=True)
            for g, p in zip(grads, ps, strict=True)
        ]
        summed = self._replicas.sum([jacobian, *flat])
        divisors = counts.to(jacobian)
        jacobian, rest = summed[0] / divisors[:, None], iter(summed[1:])
        specific = [
            [next(rest) / float(c) for _ in task] for task, c in zip(specific, counts, strict=True)
        ]
        return jacobian, specific
