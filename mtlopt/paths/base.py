"""What the backward paths share: the optimizer state they read and write (declared here), the
partition, the ranks' agreement, diagnostics, and the handling of non-finite values."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..amp import LossScaling
from ..distributed import Agreement, Replicas
from ..finite import TaskCheck
from ..partition import Partition, Reach, compiled_graph, partition_parameters, reached_parameters
from ..stepinfo import StepInfo, spread
from ..strategies.base import (
    Combined,
    GradientStrategy,
    LossStrategy,
    Strategy,
    TokenStrategy,
    gramian_of,
)
from ..tasks import StepTasks
from ..window import Window, accumulate, add_to_sum


class PathBase:
    """State and helpers of :class:`~mtlopt.MTLOptimizer` that every backward path uses."""

    strategy: Strategy
    _combiner: LossStrategy | GradientStrategy
    _window: Window
    _partition: Partition | None
    _partition_key: tuple[int, ...] | None
    _reach: Reach | None
    _replicas: Replicas | None
    _replicas_synced: bool
    _scaling: LossScaling | None
    _shared_ids: set[int] | None
    _sparse_ids: set[int]
    _loss_reach_checked: set[tuple[int, ...]]
    _objective_closed: dict[tuple[int, ...], bool]
    _warned: set[str]
    _agreed: bool
    diagnostics: bool
    nonfinite: str
    last_step: StepInfo | None
    param_groups: list[dict[str, Any]]

    @property
    def _own_ids(self) -> set[int]:
        raise NotImplementedError

    def _adopt_partition(self, old: Partition, new: Partition, trainable: list[Tensor]) -> None:
        """Make ``new`` the current partition, moving what is indexed by ``J``'s columns
        (:class:`~mtlopt.paths.JacobianPath` implements it)."""
        raise NotImplementedError

    def _agreement(self, step: StepTasks, detached: Tensor, reach: Tensor | None) -> Agreement:
        """The ranks agree on their tasks, losses and reach."""
        assert self._replicas is not None
        agreement = self._replicas.agree(
            failed=False, num_tasks=len(step.names), present=step.present, losses=detached,
            reach=reach,
        )
        self._agreed = True
        return agreement

    def _warn_zero_tasks(self, step: StepTasks, checks: list[TaskCheck]) -> None:
        zero = [step.names[t] for t, c in zip(step.present, checks, strict=True) if c.zero]
        if zero and len(step.present) > 1:
            self._warn_once(
                "zero-task",
                f"task(s) {', '.join(map(repr, zero))} have an exactly zero gradient (a `0 * loss` "
                "placeholder for a batch without labels?): gradient strategies take such a task "
                "as already optimal and may stop the shared update. Pass None (or leave the key "
                "out) for a task without a loss in this step; mtlopt.masked_mean does it for "
                "per-sample masks",
            )

    def _correct_own(
        self, params: Sequence[Tensor], grads: Sequence[Tensor], task: int | None = None
    ) -> list[Tensor]:
        """Gradients of the strategy's own parameters (UW's log-variances, IMTL's loss scales) as
        corrections of what earlier micro-batches of the step wrote.

        Those gradients depend on the loss values only (``∂(e^{-s} L + s)/∂s``), and each
        micro-batch computes them at the step's losses so far (:func:`with_values`): writing the
        difference leaves ``.grad`` holding the gradient at the step's total losses, with the
        regularizer ``+ s`` counted once, not once per micro-batch. In the gradient path each
        task's gradient of an own parameter is tracked apart (``task``).
        """
        own = self._own_ids
        if not own:
            return list(grads)
        out = list(grads)
        written = self._window.written_own
        for k, p in enumerate(params):
            if id(p) in own and out[k] is not None:
                previous = written.get((task, id(p)))
                written[task, id(p)] = out[k].detach().clone()  # .grad may become out[k] itself
                if previous is not None:
                    out[k] = out[k] - previous
        return out

    def _check_reached(self, step: StepTasks, reached: Sequence[Sequence[bool]]) -> None:
        """A present task whose loss reached no trainable parameter is an error (``reached``:
        per present task, which trainable parameters its backward pass reached)."""
        for k, task in enumerate(step.present):
            if not any(reached[k]):
                raise unreached_loss(step.names[task])

    def _write_own(
        self,
        step: StepTasks,
        partition: Partition,
        specific: list[list[Tensor | None]],
        combined: Combined,
        present: np.ndarray,
        scale: float,
        extras: list[list[Tensor | None]] | None = None,
    ) -> None:
        """Each present task's gradients of its own parameters (times the strategy's head factor
        where it has one, plus the strategy's ``extras`` where it has them: unscaled, per present
        task and parameter), kept in the window as well (without the extras)."""
        window = self._window
        head_rows = None
        if combined.head_weights is not None:
            self._warn_weighted_heads_accumulation()
            head_rows = torch.as_tensor(np.searchsorted(present, step.present))
        if extras is not None:
            self._warn_head_extra_accumulation()
        for k, task in enumerate(step.present):
            params = partition.specific[task]
            own = specific[k]
            written = own
            if head_rows is not None:
                factor = combined.head_weights[head_rows[k]]
                written = [None if g is None else g * factor.to(g.dtype) for g in own]
            if extras is not None:
                written = [_plus(g, e, scale) for g, e in zip(written, extras[k], strict=True)]
            accumulate(params, self._correct_own(params, written, int(task)))  # type: ignore[arg-type]
            for p, g in zip(params, own, strict=True):
                if g is not None:  # kept unscaled, as J: they become J's columns if p turns shared
                    add_to_sum(window.own_sums, (int(task), id(p)), g if scale == 1.0 else g / scale)

    def _warn_head_extra_accumulation(self) -> None:
        if self._window.jacobian is not None:
            self._warn_once(
                "head-extra-accumulation",
                f"{self._combiner.info.name} under gradient accumulation: each micro-batch's extra "
                "head gradients come from its own graph and the task weights of the step so far, "
                "not from the step's final weights",
            )

    def _warn_weighted_heads_accumulation(self) -> None:
        if self._window.jacobian is not None:
            self._warn_once(
                "weighted-heads-accumulation",
                f"{self._combiner.info.name} with weighted_heads=True under gradient accumulation: "
                "each micro-batch's head gradients are weighted by the weights of the step so far, "
                "not by the step's final weights",
            )

    def _info(
        self, step: StepTasks, losses: Tensor, present: np.ndarray, weights: Tensor | None
    ) -> StepInfo:
        shown = losses.clone()
        if len(present) < len(step.names):
            absent = np.ones(len(step.names), dtype=bool)
            absent[present] = False
            shown[torch.from_numpy(absent)] = math.nan
        return StepInfo(
            list(step.names), shown, weights, present=[step.names[i] for i in present]
        )

    def _gradient_info(
        self,
        step: StepTasks,
        losses: Tensor,
        present: np.ndarray,
        jacobian: Tensor | None,
        combined: Combined,
    ) -> StepInfo:
        """The step's diagnostics; ``jacobian`` may be ``None`` where ``combined`` holds ``G``."""
        weights = None
        if combined.weights is not None:
            weights = spread(combined.weights.detach(), step, present)
        info = self._info(step, losses, present, weights)
        if self.diagnostics and (jacobian is None or jacobian.shape[1] > 0):
            computed = combined.gramian
            if computed is None:
                assert jacobian is not None
                computed = gramian_of(jacobian)
            gramian = torch.from_numpy(computed)
            norms = gramian.diagonal().clamp_min(0).sqrt()
            denominator = torch.outer(norms, norms)
            cosines = torch.where(denominator > 0, gramian / denominator, torch.zeros(()))
            t = len(step.names)
            index = torch.as_tensor(present)
            info.gradient_norms = torch.full((t,), math.nan, dtype=norms.dtype)
            info.gradient_norms[index] = norms
            info.cosines = torch.full((t, t), math.nan, dtype=cosines.dtype)
            info.cosines[index[:, None], index[None, :]] = cosines
        return info

    def _partition_for(
        self,
        step: StepTasks,
        losses: list[Tensor],
        trainable: list[Tensor],
        features: Tensor | None = None,
    ) -> Partition:
        """The current partition; found afresh, from the graphs, when the trainable parameters
        changed (or in representation mode, when the task set did)."""
        key = self._key_of(trainable)
        if features is not None:
            key = (-1, *step.present.tolist(), -1, *key)
        if self._partition is not None and key == self._partition_key:
            return self._partition
        assert self._reach is not None
        reach = self._reach.copy()
        for loss, task in zip(losses, step.present, strict=True):
            hit = set(reached_parameters(loss, trainable))
            reach.add(int(task), trainable, tuple(i in hit for i in range(len(trainable))))
        if features is not None:
            reached = reached_parameters(features, trainable)
            feature_ids = {id(trainable[i]) for i in reached}
            partition = self._new_partition(step, reach, trainable, feature_ids)
        else:
            partition = self._new_partition(step, reach, trainable)
            if self._partition is not None:
                self._adopt_partition(self._partition, partition, trainable)
            self._reach = reach
        self._partition, self._partition_key = partition, key
        return partition

    def _new_partition(
        self,
        step: StepTasks,
        reach: Reach,
        trainable: list[Tensor],
        shared_ids: set[int] | None = None,
    ) -> Partition:
        if shared_ids is None:
            shared_ids = self._shared_ids
        if self._shared_ids is not None:
            known = {id(p) for group in self.param_groups for p in group["params"]}
            if not self._shared_ids <= known:
                raise ValueError(
                    f"{len(self._shared_ids - known)} tensor(s) in `shared` are not parameters of "
                    "the wrapped optimizer"
                )
        owners = {}
        if isinstance(self.strategy, TokenStrategy):
            owners = {
                id(p): task
                for task, params in enumerate(self.strategy.task_parameters())
                for p in params
            }
        many = len(step.losses) > 1
        compiled = many and compiled_graph(step.losses[0])
        if compiled and shared_ids is None:
            raise ValueError(
                "the losses come out of a torch.compile'd model, whose backward is one opaque "
                "graph node: every parameter looks reached by every task, so the shared "
                "parameters cannot be found; pass them: MTLOptimizer(..., shared=model.trunk)"
            )
        never_shared = {id(p) for p in self._combiner.parameters()}
        partition, multiply_reached = partition_parameters(
            reach.by_task, trainable, shared_ids, never_shared, owners, self._sparse_ids
        )
        if shared_ids is not None and multiply_reached and not compiled:
            warnings.warn(
                f"{len(multiply_reached)} parameter tensor(s) not in `shared` are reached by "
                "several tasks; their gradient is the sum of those tasks' gradients",
                stacklevel=5,
            )
        seen = sum(bool(r) for r in reach.by_task)
        if not partition.shared and seen > 1:
            self._warn_once(
                "no-shared",
                "no shared parameters: no parameter of the optimizer is reached by two tasks, "
                "so the strategy has nothing to combine",
            )
        elif partition.blind and seen > 1:
            blind = ", ".join(repr(step.names[i]) for i in partition.blind)
            self._warn_once(
                f"blind-{blind}",
                f"task(s) {blind} reach none of the shared parameters: their gradient rows are "
                "zero, which strategies that balance or normalise gradients (MGDA, IMTL, "
                "Nash-MTL, ...) take as a task already at a stationary point",
            )
        return partition

    def _trainable(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _key_of(self, trainable: list[Tensor]) -> tuple[int, ...]:
        return tuple(map(id, trainable))

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=4)

    def _sync_replicas_once(self) -> None:
        if not self._replicas_synced:
            assert self._replicas is not None
            self._replicas.broadcast_strategy(self.strategy)
            self._replicas_synced = True

    def _nonfinite_loss(self, step: StepTasks, losses: Tensor) -> StepInfo:
        bad = [
            n for n, v in zip(step.present_names, losses.tolist(), strict=True)
            if not math.isfinite(v)
        ]
        return self._nonfinite(step, losses, f"non-finite loss for task(s) {', '.join(bad)}")

    def _bad_gradient(self, step: StepTasks, losses: Tensor, reason: str) -> StepInfo:
        """A non-finite gradient: an error (or a skip), or with a GradScaler an overflow."""
        if self._scaling is None or not self._scaling.enabled:
            return self._nonfinite(step, losses, reason)
        params = self._trainable()
        self._scaling.signal_overflow(params)
        info = self._skipped_info(step, losses, f"{reason}: overflow, skipped by the scaler")
        self._window = Window(skipped=True, info=info, marker=params[0])
        self.last_step = info
        return info

    def _nonfinite(self, step: StepTasks, losses: Tensor, reason: str) -> StepInfo:
        if self.nonfinite == "raise":
            raise FloatingPointError(
                f"{reason}; nothing was changed (use nonfinite='skip' to skip)"
            )
        info = self._skipped_info(step, losses, reason)
        self._window = Window(skipped=True, info=info)
        if self._scaling is not None and self._scaling.enabled:
            # The scaler must see the skip too (it refuses a step without any gradient checks).
            params = self._trainable()
            self._scaling.signal_overflow(params)
            self._window.marker = params[0]
            self.last_step = info
        return info

    def _skipped_info(self, step: StepTasks, losses: Tensor, reason: str) -> StepInfo:
        full = torch.full((len(step.names),), math.nan, dtype=torch.float64)
        full[torch.as_tensor(step.present)] = losses.detach().double().cpu()
        return StepInfo(
            list(step.names), full, skipped=True, reason=reason, present=step.present_names
        )


def unreached_loss(task: str) -> ValueError:
    """The error for a task whose loss reaches no parameter of the wrapped optimizer."""
    return ValueError(
        f"the loss of task {task!r} reaches no parameter of the wrapped optimizer (was it computed "
        "from another model, or is it a constant placeholder?); pass None for a task without a "
        "loss in this step; nothing was changed"
    )


def _plus(grad: Tensor | None, extra: Tensor | None, scale: float) -> Tensor | None:
    """``grad + scale · extra`` (``.grad`` holds scaled gradients until ``scaler.unscale_``)."""
    if extra is None:
        return grad
    if scale != 1.0:
        extra = extra * scale
    return extra if grad is None else grad + extra.to(grad.dtype)
