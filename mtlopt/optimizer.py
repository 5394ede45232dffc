"""``MTLOptimizer``: wraps any ``torch.optim.Optimizer`` and combines task losses with a strategy."""

from __future__ import annotations

import copy
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from .amp import LossScaling
from .distributed import Agreement, ReplicaError, Replicas
from .engine import TaskGradients, rebuild_jacobian, task_gradients, unflatten
from .finite import all_finite, finite_tensors, task_magnitudes
from .multi import OptimizerChain
from .partition import (
    Partition,
    Reach,
    column_map,
    compiled_graph,
    partition_parameters,
    reached_parameters,
)
from .registry import create
from .strategies.base import (
    Combined,
    Commit,
    GradientStrategy,
    LossStrategy,
    Strategy,
    TokenStrategy,
    gramian_of,
)
from .tasks import Losses, StepTasks, check_names, read_losses

NonFinite = Literal["raise", "skip"]
_SAVED = ("optimizer", "strategy", "strategy_name", "task_names")


@dataclass
class StepInfo:
    """Diagnostics of the last optimizer step (``MTLOptimizer.last_step``).

    Per-task tensors hold one entry per task of the optimizer, in its order (``task_names``); an
    entry of a task absent from the step is NaN.
    """

    task_names: list[str]
    losses: Tensor
    """Detached task losses (summed over the micro-batches of the step)."""
    weights: Tensor | None = None
    """Effective task weights chosen by the strategy (``None`` for non-linear gradient methods)."""
    gradient_norms: Tensor | None = None
    """‖g_i‖ of each task's shared gradient (gradient strategies)."""
    cosines: Tensor | None = None
    """T×T cosine similarities of the task gradients (gradient strategies)."""
    skipped: bool = False
    """True when the step was skipped because of a non-finite loss or gradient (``nonfinite='skip'``)."""
    reason: str = ""
    present: list[str] = field(default_factory=list)
    """The tasks that had a loss in this step."""

    def as_dict(self) -> dict[str, Any]:
        """Plain Python numbers keyed by task name (present tasks only), for loggers."""
        out: dict[str, Any] = {"skipped": self.skipped}
        present = set(self.present or self.task_names)
        for i, name in enumerate(self.task_names):
            if name not in present:
                continue
            out[f"loss/{name}"] = float(self.losses[i])
            if self.weights is not None:
                out[f"weight/{name}"] = float(self.weights[i])
            if self.gradient_norms is not None:
                out[f"grad_norm/{name}"] = float(self.gradient_norms[i])
        if self.cosines is not None:
            for i, a in enumerate(self.task_names):
                for j in range(i + 1, len(self.task_names)):
                    b = self.task_names[j]
                    if a in present and b in present:
                        out[f"cos/{a}~{b}"] = float(self.cosines[i, j])
        return out


@dataclass
class _Window:
    """What has been accumulated since the last step: per-task gradients, losses, pending state."""

    present: np.ndarray | None = None
    """Tasks with a loss in any micro-batch of the window (increasing indices)."""
    jacobian: Tensor | None = None
    """Summed shared gradients, one row per task of ``present``."""
    losses: Tensor | None = None
    """Summed losses of every task (0 for a task not yet present), float64."""
    written: Tensor | None = None
    written_own: dict[tuple[int | None, int], Tensor] = field(default_factory=dict)
    own_sums: dict[tuple[int, int], Tensor] = field(default_factory=dict)
    written_sparse: dict[int, Tensor] = field(default_factory=dict)
    """``id(parameter) →`` what the window wrote to a sparse shared parameter's ``.grad``."""
    """``(task, id(parameter)) → `` summed gradient of a task's own parameter in the window."""
    commit: Commit | None = None
    info: StepInfo | None = None
    skipped: bool = False
    marker: Tensor | None = None
    """A parameter whose ``.grad`` the window wrote: ``None`` there means someone zeroed it."""


class MTLOptimizer(torch.optim.Optimizer):
    """Wrap an optimizer so that ``step(losses)`` combines several task losses with a strategy.

    Example::

        opt = mtlopt.MTLOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-4), "pcgrad")
        opt.zero_grad()
        opt.step([loss_a, loss_b])     # or opt.backward(losses); clip; opt.step()

    Task-specific parameters (reached by one task only) receive that task's gradient unchanged.
    Shared parameters receive the strategy's combination of the task gradients (gradient
    strategies) or the gradient of the strategy's scalarized loss (loss strategies, whose papers
    back-propagate the weighted loss through the whole network, heads included).

    Args:
        optimizer: the optimizer to wrap; its ``param_groups`` and ``state`` are shared with it.
            A list of optimizers (``[SparseAdam(embeddings), Adam(rest)]``) is stepped as one
            (:class:`~mtlopt.OptimizerChain`).
        strategy: a registered name (see :func:`mtlopt.available`) or a strategy instance.
        tasks: the task names, in order. By default the first step's keys (``task0, ...`` for a
            list) fix them. Strategies that own per-task parameters (UW, IMTL) create them when
            the tasks are fixed: with ``tasks=``, at construction, so that a learning-rate
            scheduler created afterwards sees their group; otherwise at the first step (a
            scheduler created before then leaves their learning rate constant).
        shared: the shared parameters (an iterable of parameters or a module). By default they are
            found once, on the first step, as the parameters reached by two tasks or more.
        nonfinite: ``"raise"`` (default) raises ``FloatingPointError`` naming the task when a loss
            or gradient is NaN or infinite, before anything is changed; ``"skip"`` skips the step.
            With a ``scaler``, a non-finite gradient is an overflow instead: the scaler skips the
            step and lowers its scale (see :mod:`mtlopt.amp`).
        diagnostics: compute gradient norms and cosines for :attr:`last_step` (gradient strategies).
        scaler: a ``torch.amp.GradScaler`` for mixed precision. Each task loss is scaled, the
            per-task gradients are unscaled before they are combined; step with
            ``scaler.step(opt)`` after :meth:`backward` (or ``opt.step(losses)``), then
            ``scaler.update()``. Its state is saved by :meth:`state_dict`.
        process_group: the ``torch.distributed`` group of data-parallel replicas. By default, the
            default group when ``torch.distributed`` is initialised with several ranks: per-task
            gradients and losses are then averaged across ranks (one ``all_reduce`` per
            :meth:`backward`) before the strategy combines them (see :mod:`mtlopt.distributed`).
        **strategy_kwargs: hyperparameters passed to the strategy when it is given by name.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        strategy: str | Strategy = "ew",
        *,
        tasks: Sequence[str] | None = None,
        shared: Iterable[Tensor] | nn.Module | None = None,
        nonfinite: NonFinite = "raise",
        diagnostics: bool = True,
        scaler: torch.amp.GradScaler | None = None,
        process_group: Any = None,
        **strategy_kwargs: Any,
    ) -> None:
        if isinstance(optimizer, (list, tuple)):
            optimizer = OptimizerChain(*optimizer)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, MTLOptimizer):
            raise TypeError("the optimizer is already an MTLOptimizer")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        names = check_names(tasks) if tasks is not None else None
        if isinstance(strategy, str):
            if names is not None:
                strategy_kwargs.setdefault("num_tasks", len(names))
            strategy = create(strategy, **strategy_kwargs)
        elif strategy_kwargs:
            raise TypeError("strategy keyword arguments are only accepted with a strategy name")
        if not isinstance(strategy, (LossStrategy, GradientStrategy, TokenStrategy)):
            raise TypeError(f"{type(strategy).__name__} is not a loss, gradient or token strategy")

        self.optimizer = optimizer
        self.strategy = strategy
        # A token strategy (DTME) observes and reshapes the model; its base combines the losses.
        self._combiner: LossStrategy | GradientStrategy = (
            strategy.base if isinstance(strategy, TokenStrategy) else strategy
        )
        self.nonfinite = nonfinite
        self.diagnostics = diagnostics
        self._shared_ids = _parameter_ids(shared) if shared is not None else None
        self._partition: Partition | None = None
        self._partition_key: tuple[int, ...] | None = None
        self._reach: Reach | None = None
        self._loss_reach_checked: set[tuple[int, ...]] = set()
        self._tasks: tuple[str, ...] | None = None
        self._window = _Window()
        self.last_step: StepInfo | None = None
        self._last_present: np.ndarray | None = None
        self._awaiting_update = False
        self._scaling = LossScaling(scaler) if scaler is not None else None
        self._replicas = Replicas.detect(process_group)
        self._replicas_synced = False
        self._warned: set[str] = set()
        self._updates = 0
        self._joined: set[int] = set()
        self._sparse_ids: set[int] = set()
        if self._replicas is not None and isinstance(strategy, TokenStrategy):
            raise NotImplementedError(
                "DTME under torch.distributed is not supported yet: each rank would analyse its "
                "own batches and could choose a different expansion"
            )

        # The torch.optim.Optimizer contract, sharing the wrapped optimizer's groups and state.
        self.defaults = optimizer.defaults
        self._optimizer_step_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._patch_step_function()
        self._warned_capturable_if_run_uncaptured = True
        if names is not None:
            self._fix_tasks(names)
        else:
            self._join_strategy_parameters()
        if isinstance(strategy, TokenStrategy):
            strategy.attach(self)

    # torch.optim.Optimizer views ------------------------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def task_names(self) -> list[str] | None:
        """The optimizer's tasks, in order (fixed by ``tasks=`` or by the first step's keys)."""
        return None if self._tasks is None else list(self._tasks)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._window = _Window()

    def __repr__(self) -> str:
        return f"MTLOptimizer({self.strategy!r}, {self.optimizer!r})"

    # Tasks --------------------------------------------------------------------------------------
    def _fix_tasks(self, names: tuple[str, ...]) -> None:
        """Fix the task set; strategies that size state or parameters by it are built now."""
        self.strategy.check_num_tasks(len(names))
        self._tasks = names
        self._reach = Reach(len(names))
        self.strategy.build(len(names))
        if isinstance(self.strategy, TokenStrategy):
            self._combiner.build(len(names))
        self._join_strategy_parameters()

    def _join_strategy_parameters(self) -> None:
        """The strategy's own parameters join the wrapped optimizer as one group of their own,
        without weight decay (UW's log-variances, IMTL's loss scales)."""
        new = [p for p in self._combiner.parameters() if id(p) not in self._joined]
        if new:
            self.optimizer.add_param_group({"params": new, "weight_decay": 0.0})
            self._joined.update(map(id, new))

    @property
    def _own_ids(self) -> set[int]:
        return self._joined

    # Backward -----------------------------------------------------------------------------------
    def backward(self, losses: Losses, *, features: Tensor | None = None) -> StepInfo:
        """Back-propagate the task losses; the shared gradients hold the combined update afterwards.

        ``losses`` maps task names to scalar losses (a sequence is read as ``task0, task1, ...``).
        A task without a loss in this step is left out or given as ``None``: strategies then
        combine the present tasks only (see the guide, "Tasks missing from a batch").

        Call it several times before :meth:`step` to accumulate gradients over micro-batches: the
        per-task gradients are accumulated and the strategy combines their sums.

        ``features`` switches a gradient strategy to representation mode (MGDA-UB style, LibMTL's
        ``rep_grad``): per-task gradients are taken with respect to this shared representation (one
        cheap backward per task through the heads), combined, and back-propagated through the trunk
        once. The shared parameters are then those that produce ``features``. In this mode each
        ``backward`` call combines its own micro-batch (the trunk graph of each is needed).
        """
        self._agreed = self._replicas is None
        try:
            return self._backward(losses, features)
        except ReplicaError:
            raise
        except Exception:
            if not self._agreed:
                # Every other rank is waiting in the agreement: tell them, then raise here.
                assert self._replicas is not None
                self._replicas.agree(failed=True, num_tasks=len(self._tasks or ()))
            raise

    def _backward(self, losses: Losses, features: Tensor | None) -> StepInfo:
        step = read_losses(losses, self._tasks)
        self.strategy.check_num_tasks(len(step.names))
        if self._window_is_stale():
            self._window = _Window()
        window = self._window
        if window.skipped:
            return window.info  # type: ignore[return-value]
        replicas = self._replicas
        if replicas is not None and features is not None:
            raise NotImplementedError(
                "representation mode (features=) under torch.distributed is not supported: "
                "each rank's features are different samples, so their gradients cannot be averaged"
            )
        detached = _detach_losses(step.losses)
        # Under torch.distributed the losses are checked after their average across ranks, so that
        # every rank takes the same decision.
        if replicas is None and not all_finite(detached):
            return self._nonfinite_loss(step, detached)
        if isinstance(self._combiner, LossStrategy) and features is not None:
            raise ValueError(
                f"{self._combiner.info.name} is a loss strategy: representation mode "
                "(features=) applies to gradient strategies only"
            )
        first = self._tasks is None
        if first:
            self._fix_tasks(step.names)
        try:
            self._warn_if_update_missed()
            if isinstance(self.strategy, TokenStrategy):
                if not step.all_present:
                    raise ValueError(
                        f"{self.strategy.info.name} needs every task's loss in every step (its "
                        f"task streams and conflict counts are per task); missing: "
                        f"{', '.join(sorted(set(step.names) - set(step.present_names)))}"
                    )
                self.strategy.observe(list(step.losses))
            if isinstance(self._combiner, LossStrategy):
                return self._backward_scalarized(step, detached)
            return self._backward_gradients(step, detached, features)
        except BaseException:
            if first and self._updates == 0 and self._window.info is None:
                self._tasks, self._reach = None, None
            raise

    def _backward_gradients(
        self, step: StepTasks, detached: Tensor, features: Tensor | None
    ) -> StepInfo:
        window = self._window
        present = step.present
        tensors = list(step.losses)
        if window.losses is not None:
            tensors = _with_values(tensors, _window_losses(window, step, detached)[present])
        with self._combiner.restricted_to(step.restriction):
            tensors = [
                self._combiner.transform_loss(k, t.reshape(())) for k, t in enumerate(tensors)
            ]
        scale = 1.0
        if self._scaling is not None:
            tensors, scale = self._scaling.scale(tensors)
        if features is not None:
            return self._backward_representation(step, tensors, detached, features, scale)
        return self._backward_jacobian(step, tensors, detached, scale)

    def _backward_scalarized(self, step: StepTasks, detached: Tensor) -> StepInfo:
        assert isinstance(self._combiner, LossStrategy)
        window = self._window
        device = step.losses[0].device
        params = self._trainable()
        self._check_losses_reach(step, params)
        given = list(step.losses)
        if self._replicas is not None:
            step, given, detached = self._agree_losses(step, detached)
        if window.losses is not None and not self._combiner.linear_in_losses:
            self._warn_once(
                "nonlinear-accumulation",
                f"{self._combiner.info.name}'s task weights depend on the current losses: with "
                "gradient accumulation each micro-batch is weighted by the losses accumulated so "
                "far (the last one by the step's total), not by the step's total losses",
            )
        if self._replicas is not None and not all_finite(detached):
            return self._nonfinite_loss(step, detached)
        seen = _window_losses(window, step, detached)
        present = step.present
        values = seen[present]
        stacked = torch.stack(
            _with_values([loss.reshape(()).to(device) for loss in given], values)
        )
        with self._combiner.restricted_to(step.restriction):
            scalarized = self._combiner.scalarize(stacked)
        objective = scalarized.loss
        if self._scaling is not None:
            (objective,), _ = self._scaling.scale([objective])
        grads = torch.autograd.grad(objective, params, allow_unused=True)
        if self._replicas is not None:
            anywhere = self._replicas.union(torch.tensor([g is not None for g in grads]))
            grads = tuple(
                (torch.zeros_like(p) if g is None else g) if hit else None
                for p, g, hit in zip(params, grads, anywhere.tolist(), strict=True)
            )
        reached = [(p, g) for p, g in zip(params, grads, strict=True) if g is not None]
        grads_present = [g for _, g in reached]
        if self._replicas is not None:
            grads_present = self._replicas.mean(grads_present)
        if not finite_tensors(grads_present):
            return self._bad_gradient(step, detached, "non-finite gradient of the combined loss")
        params_present = [p for p, _ in reached]
        _accumulate(params_present, self._correct_own(params_present, grads_present))
        window.losses = seen
        window.present = _union(window.present, present)
        window.commit = self._combiner.commit_restricted(step.restriction, scalarized.commit)
        window.marker = params_present[0] if params_present else None
        window.info = self._info(step, seen, window.present, _spread(scalarized.weights, step))
        return window.info

    def _backward_jacobian(
        self, step: StepTasks, losses: list[Tensor], detached: Tensor, scale: float
    ) -> StepInfo:
        assert isinstance(self._combiner, GradientStrategy)
        window = self._window
        trainable = self._trainable()
        partition = self._partition_for(step, losses, trainable)
        grads = task_gradients(losses, trainable, partition)
        self._check_reached(step, grads)
        counts = None
        if self._replicas is not None:
            step, grads, detached, counts = self._agree_gradients(step, grads, detached)
        partition, jacobian = self._follow_reach(step, grads, trainable, partition)
        specific = self._specific_gradients(step, grads, trainable, partition)
        if scale != 1.0:
            jacobian.mul_(1.0 / scale)  # exact: GradScaler's scales are powers of two
        if counts is not None:
            jacobian, specific = self._average(
                jacobian, specific, counts, [partition.specific[t] for t in step.present]
            )
            if not all_finite(detached):
                return self._nonfinite_loss(step, detached)
        sparse_grads = [[own.get(i) for i in grads.sparse] for own in grads.own]
        checked = [[*s, *g] for s, g in zip(specific, sparse_grads, strict=True)]
        magnitudes = task_magnitudes(jacobian, checked)
        for name, magnitude in zip(step.present_names, magnitudes, strict=True):
            if not math.isfinite(magnitude):
                return self._bad_gradient(step, detached, f"non-finite gradient for task {name!r}")
        self._warn_zero_tasks(step, magnitudes)

        present = _union(window.present, step.present)
        jacobian = _add_rows(window.jacobian, window.present, jacobian, step.present, present)
        losses_sum = _window_losses(window, step, detached)
        restriction = None if len(present) == len(step.names) else present
        try:
            with self._combiner.restricted_to(restriction):
                combined = self._combiner.combine(
                    jacobian, losses_sum[present].to(jacobian.device)
                )
        except FloatingPointError as error:
            return self._nonfinite(step, detached, str(error))
        if not math.isfinite(task_magnitudes(combined.direction[None], [[]])[0]):
            return self._nonfinite(
                step, detached, f"{self._combiner.info.name} produced a non-finite update"
            )

        delta = (
            combined.direction if window.written is None else combined.direction - window.written
        )
        if scale != 1.0:
            delta = delta * scale  # .grad holds scaled gradients until scaler.unscale_
        _accumulate(partition.shared, unflatten(delta, partition.shared))
        for k, task in enumerate(step.present):
            params = partition.specific[task]
            own = specific[k]
            _accumulate(params, self._correct_own(params, own, int(task)))  # type: ignore[arg-type]
            for p, g in zip(params, own, strict=True):
                if g is not None:
                    _add_to_sum(window.own_sums, (int(task), id(p)), g)
        if partition.sparse:
            self._write_sparse(step, grads, trainable, partition, present, combined, scale)
        window.present, window.jacobian, window.losses = present, jacobian, losses_sum
        window.written = combined.direction
        window.commit = self._combiner.commit_restricted(restriction, combined.commit)
        window.marker = partition.shared[0] if partition.shared else None
        window.info = self._gradient_info(step, losses_sum, present, jacobian, combined)
        return window.info

    def _write_sparse(
        self,
        step: StepTasks,
        grads: TaskGradients,
        trainable: list[Tensor],
        partition: Partition,
        present: np.ndarray,
        combined: Combined,
        scale: float,
    ) -> None:
        """Shared parameters with sparse gradients get ``Σ_i w_i g_i`` with the strategy's task
        weights (the plain sum for strategies without weights), kept sparse."""
        window = self._window
        index_of = {id(p): i for i, p in enumerate(trainable)}
        for k, task in enumerate(step.present):
            for p in partition.sparse:
                g = grads.own[k].get(index_of[id(p)])
                if g is not None:
                    _add_to_sum(window.own_sums, (int(task), id(p)), g / scale)
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
            _accumulate([p], [delta * scale if scale != 1.0 else delta])

    def _specific_gradients(
        self, step: StepTasks, grads: TaskGradients, trainable: list[Tensor], partition: Partition
    ) -> list[list[Tensor | None]]:
        """Each present task's gradients of its own parameters (``None`` for one it reached on an
        earlier step only)."""
        index_of = {id(p): i for i, p in enumerate(trainable)}
        return [
            [grads.own[k].get(index_of[id(p)]) for p in partition.specific[task]]
            for k, task in enumerate(step.present)
        ]

    def _check_reached(self, step: StepTasks, grads: TaskGradients) -> None:
        for k, task in enumerate(step.present):
            if not any(grads.reached[k]):
                raise ValueError(
                    f"the loss of task {step.names[task]!r} reaches no parameter of the wrapped "
                    "optimizer (was it computed from another model, or is it a constant "
                    "placeholder?); pass None for a task without a loss in this step; nothing "
                    "was changed"
                )

    def _agreement(self, step: StepTasks, detached: Tensor, reach: Tensor | None) -> Agreement:
        """The ranks agree on their tasks, losses and reach; then rank 0's strategy state is
        given to every rank (once)."""
        assert self._replicas is not None
        agreement = self._replicas.agree(
            failed=False, num_tasks=len(step.names), present=step.present, losses=detached,
            reach=reach,
        )
        self._agreed = True
        self._sync_replicas_once()
        return agreement

    def _agree_losses(
        self, step: StepTasks, detached: Tensor
    ) -> tuple[StepTasks, list[Tensor], Tensor]:
        """Loss path under torch.distributed: the tasks of any rank, their losses averaged over
        the ranks that have them; a task's loss here is scaled so that averaging the gradients
        over all ranks averages it over those ranks only, and a task absent here enters as its
        (constant) mean."""
        agreement = self._agreement(step, detached, None)
        union = torch.nonzero(agreement.counts).reshape(-1).numpy()
        mine = dict(zip(step.present.tolist(), step.losses, strict=True))
        size = self._replicas.size  # type: ignore[union-attr]
        given = []
        for task in union.tolist():
            mean = agreement.losses[task]
            if task in mine:
                loss = mine[task] * (size / int(agreement.counts[task]))
                given.append(_with_values([loss], mean.reshape(1))[0])
            else:
                given.append(mean.to(step.losses[0]).detach())
        united = StepTasks(step.names, union, tuple(given))
        return united, given, agreement.losses[union].to(detached.device)

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
        sparse = {id(trainable[i]) for i in grads.sparse} - self._sparse_ids
        if sparse and self._replicas is not None:
            raise NotImplementedError(
                "shared parameters with sparse gradients (nn.Embedding(sparse=True)) under "
                "torch.distributed are not supported: use dense embeddings there"
            )
        key = self._key_of(trainable)
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
        jacobian = rebuild_jacobian(grads, trainable, partition, new)
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
            start = 0
            for p in new.shared:
                stop = start + p.numel() * (2 if p.is_complex() else 1)
                if id(p) not in before:
                    for r, task in enumerate(window.present):  # type: ignore[arg-type]
                        g = window.own_sums.get((int(task), id(p)))
                        if g is not None:
                            flat = torch.view_as_real(g) if g.is_complex() else g
                            rows[r, start:stop] = flat.reshape(-1)
                            written[start:stop] += flat.reshape(-1)
                start = stop
            window.jacobian, window.written = rows, written
        self._partition = new
        self._partition_key = self._key_of(trainable)

    def _warn_zero_tasks(self, step: StepTasks, magnitudes: list[float]) -> None:
        zero = [step.names[t] for t, m in zip(step.present, magnitudes, strict=True) if m == 0.0]
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
        micro-batch computes them at the step's losses so far (:func:`_with_values`): writing the
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
                written[task, id(p)] = out[k]
                if previous is not None:
                    out[k] = out[k] - previous
        return out

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

    def _backward_representation(
        self,
        step: StepTasks,
        losses: list[Tensor],
        detached: Tensor,
        features: Tensor,
        scale: float,
    ) -> StepInfo:
        assert isinstance(self._combiner, GradientStrategy)
        if not self._combiner.supports_representation:
            raise ValueError(f"{self._combiner.info.name} does not support representation mode")
        if not isinstance(features, Tensor) or not features.requires_grad:
            raise ValueError("features must be a tensor that requires grad (the trunk's output)")
        window = self._window
        partition = self._partition_for(step, losses, self._trainable(), features=features)
        per_task = [
            torch.autograd.grad(
                loss,
                [features, *partition.specific[task]],
                retain_graph=True,
                allow_unused=True,
                materialize_grads=True,
            )
            for loss, task in zip(losses, step.present, strict=True)
        ]
        jacobian = torch.stack([grads[0].reshape(-1) for grads in per_task])
        if scale != 1.0:
            jacobian.mul_(1.0 / scale)
        own_grads = [list(grads[1:]) for grads in per_task]
        magnitudes = task_magnitudes(jacobian, own_grads)
        for name, magnitude in zip(step.present_names, magnitudes, strict=True):
            if not math.isfinite(magnitude):
                return self._bad_gradient(step, detached, f"non-finite gradient for task {name!r}")
        self._warn_zero_tasks(step, magnitudes)
        try:
            with self._combiner.restricted_to(step.restriction):
                combined = self._combiner.combine(jacobian, detached.to(jacobian.device))
        except FloatingPointError as error:
            return self._nonfinite(step, detached, str(error))
        trunk = torch.autograd.grad(
            features,
            partition.shared,
            grad_outputs=(combined.direction * scale).view_as(features),
            allow_unused=True,
            materialize_grads=True,
        )
        if not finite_tensors(trunk):
            return self._bad_gradient(
                step, detached, f"{self._combiner.info.name} produced a non-finite update"
            )
        _accumulate(partition.shared, trunk)
        for task, grads in zip(step.present, per_task, strict=True):
            _accumulate(partition.specific[task], grads[1:])
        window.losses = _window_losses(window, step, detached)
        window.present = _union(window.present, step.present)
        window.commit = self._combiner.commit_restricted(step.restriction, combined.commit)
        window.marker = partition.shared[0] if partition.shared else None
        window.info = self._gradient_info(step, window.losses, step.present, jacobian, combined)
        return window.info

    def _info(
        self, step: StepTasks, losses: Tensor, present: np.ndarray, weights: Tensor | None
    ) -> StepInfo:
        shown = losses.clone()
        shown[np.setdiff1d(np.arange(len(step.names)), present)] = math.nan
        return StepInfo(
            list(step.names), shown, weights, present=[step.names[i] for i in present]
        )

    def _gradient_info(
        self,
        step: StepTasks,
        losses: Tensor,
        present: np.ndarray,
        jacobian: Tensor,
        combined: Combined,
    ) -> StepInfo:
        weights = None
        if combined.weights is not None:
            weights = _spread(combined.weights.detach(), step, present)
        info = self._info(step, losses, present, weights)
        if self.diagnostics and jacobian.shape[1] > 0:
            computed = combined.gramian if combined.gramian is not None else gramian_of(jacobian)
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

    # Step ---------------------------------------------------------------------------------------
    def step(  # type: ignore[override]
        self,
        losses: Losses | Callable[[], Losses] | None = None,
    ) -> StepInfo | None:
        """Combine (if ``losses`` are given, back-propagate them first) and update the parameters.

        ``losses`` may also be a closure returning the task losses, as with ``torch.optim``'s
        ``step(closure)``; it is evaluated with gradients enabled.
        """
        closure = losses if callable(losses) else None
        if closure is not None:
            with torch.enable_grad():
                losses = closure()
        if losses is not None:
            self.backward(losses)  # type: ignore[arg-type]
            if self._scaling is not None and self._scaling.enabled:
                # The scaler unscales, checks for overflow and, unless it finds one, calls step()
                # again, without losses (below).
                updates = self._updates
                self._scaling.scaler.step(self)
                if self._updates > updates:
                    self._after_step(closure)
                else:
                    self._window = _Window()  # the scaler skipped this step
                return self.last_step
        if self._scaling is not None:
            self._scaling.check_step_allowed(self)
        window = self._window
        info = window.info
        if window.skipped:
            self._window = _Window()
            self.last_step = info
            return info
        if window.commit is not None:
            window.commit()
        self.optimizer.step()
        self._updates += 1
        self._last_present = window.present
        self._window = _Window()
        self.last_step = info
        if isinstance(self.strategy, TokenStrategy):
            self.strategy.after_step()
        self._after_step(closure)
        return info

    def _after_step(self, closure: Callable[[], Losses] | None) -> None:
        if not getattr(self._combiner, "needs_losses_after_step", False):
            return
        if closure is None:
            self._awaiting_update = True
            return
        with torch.no_grad():
            self.update(closure())

    def _warn_if_update_missed(self) -> None:
        if self._awaiting_update:
            self._warn_once(
                "missed-update",
                f"{self._combiner.info.name} learns from the losses re-evaluated after each step, "
                "and none were given: its task weights stay where they are. Pass a closure, "
                "opt.step(lambda: compute_losses(batch)), or call opt.update(losses) after "
                "opt.step(...)",
            )
            self._awaiting_update = False

    def update(self, losses: Losses) -> None:
        """Feed the losses of the same batch, re-evaluated after :meth:`step`, to strategies that
        learn from them (FAMO). ``step(closure)`` does this by itself. The tasks must be those of
        the last step (by name, or a list over all tasks with ``None`` for the absent ones)."""
        if not getattr(self._combiner, "needs_losses_after_step", False):
            raise TypeError(f"{self._combiner.info.name} does not learn from post-step losses")
        if self._tasks is None or self._last_present is None:
            raise RuntimeError("update() needs a step first")
        if isinstance(losses, Tensor):
            losses = list(losses.reshape(-1))
        if isinstance(losses, Mapping):
            given = dict(losses)
        else:
            values = list(losses)
            present_names = [self._tasks[i] for i in self._last_present]
            if len(values) == len(self._tasks):
                given = dict(zip(self._tasks, values, strict=True))
            elif len(values) == len(present_names):
                given = dict(zip(present_names, values, strict=True))
            else:
                raise ValueError(
                    f"update() got {len(values)} losses; the last step had tasks "
                    f"{', '.join(present_names)} of {len(self._tasks)}"
                )
        wanted = [self._tasks[i] for i in self._last_present]
        got = [k for k, v in given.items() if v is not None]
        if sorted(got) != sorted(wanted):
            raise ValueError(
                f"update() needs the losses of the last step's tasks {wanted}, got {sorted(got)}"
            )
        after = _detach_losses([torch.as_tensor(given[name]) for name in wanted])
        if self._replicas is not None:
            (after,) = self._replicas.mean([after])
        restriction = None if len(wanted) == len(self._tasks) else self._last_present
        with self._combiner.restricted_to(restriction):
            self._combiner.update(after)  # type: ignore[union-attr]
        self._awaiting_update = False

    # State --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state, the strategy's (as tensors and Python primitives, so that
        ``torch.load``'s default ``weights_only=True`` reads it), its name and the task names."""
        state = {
            "optimizer": self.optimizer.state_dict(),
            "strategy": self.strategy.state_dict(),
            "strategy_name": self.strategy.info.name,
            "task_names": self.task_names,
        }
        if self._scaling is not None:
            state["scaler"] = self._scaling.scaler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict`. The strategy's name and the task names must
        match (an optimizer that has not fixed its tasks takes the saved ones); everything is
        checked before anything changes, and a failure leaves the optimizer as it was."""
        missing = set(_SAVED) - set(state_dict)
        if missing:
            raise KeyError(
                f"not an MTLOptimizer state dict (missing {sorted(missing)}); to load a plain "
                "optimizer's state use opt.optimizer.load_state_dict(...)"
            )
        name = state_dict["strategy_name"]
        if name != self.strategy.info.name:
            raise ValueError(
                f"this checkpoint was saved with strategy {name!r}; this optimizer runs "
                f"{self.strategy.info.name!r}: create it with strategy={name!r} to load it"
            )
        saved_tasks = state_dict["task_names"]
        saved_tasks = None if saved_tasks is None else tuple(saved_tasks)
        if self._tasks is not None and saved_tasks is not None and saved_tasks != self._tasks:
            raise ValueError(
                f"this checkpoint was saved with tasks {list(saved_tasks)}; this optimizer has "
                f"{list(self._tasks)}"
            )
        snapshot = (
            self.strategy.state_dict(),
            copy.deepcopy(self.optimizer.state_dict()),
            self._tasks,
            self._reach,
        )
        try:
            if self._tasks is None and saved_tasks is not None:
                self._fix_tasks(saved_tasks)
            # The strategy first: DTME re-applies its expansion, which adds parameter groups that
            # the wrapped optimizer's saved state refers to.
            self.strategy.load_state_dict(state_dict["strategy"])
            self._join_strategy_parameters()
            self.optimizer.load_state_dict(state_dict["optimizer"])
            if self._scaling is not None and "scaler" in state_dict:
                self._scaling.scaler.load_state_dict(state_dict["scaler"])
        except BaseException:
            self.strategy.load_state_dict(snapshot[0])
            self.optimizer.load_state_dict(snapshot[1])
            self._tasks, self._reach = snapshot[2], snapshot[3]
            raise
        self._window = _Window()

    # Helpers ------------------------------------------------------------------------------------
    def _sync_replicas_once(self) -> None:
        if not self._replicas_synced:
            assert self._replicas is not None
            self._replicas.broadcast_strategy(self.strategy)
            self._replicas_synced = True

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=4)

    def _window_is_stale(self) -> bool:
        """Whether someone else zeroed the gradients since the window began (``model.zero_grad()``
        in place of ``opt.zero_grad()``): the window's record of ``.grad`` is then void."""
        marker = self._window.marker
        if marker is None:
            return False
        if marker.grad is None:
            return True
        return self._window.skipped and not bool(torch.isinf(marker.grad).any())

    def _trainable(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _key_of(self, trainable: list[Tensor]) -> tuple[int, ...]:
        return tuple(map(id, trainable))

    def _check_losses_reach(self, step: StepTasks, params: list[Tensor]) -> None:
        """A loss that reaches no parameter of the optimizer is an error (checked by walking the
        graphs once per combination of present tasks and trainable parameters)."""
        key = (*step.present.tolist(), -1, *map(id, params))
        if key in self._loss_reach_checked:
            return
        for name, loss in zip(step.present_names, step.losses, strict=True):
            if not reached_parameters(loss, params):
                raise ValueError(
                    f"the loss of task {name!r} reaches no parameter of the wrapped optimizer (was "
                    "it computed from another model, or is it a constant placeholder?); pass None "
                    "for a task without a loss in this step; nothing was changed"
                )
        self._loss_reach_checked.add(key)

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
        self._window = _Window(skipped=True, info=info, marker=params[0])
        self.last_step = info
        return info

    def _nonfinite(self, step: StepTasks, losses: Tensor, reason: str) -> StepInfo:
        if self.nonfinite == "raise":
            raise FloatingPointError(
                f"{reason}; nothing was changed (use nonfinite='skip' to skip)"
            )
        info = self._skipped_info(step, losses, reason)
        self._window = _Window(skipped=True, info=info)
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


def _parameter_ids(shared: Iterable[Tensor] | nn.Module) -> set[int]:
    params = list(shared.parameters()) if isinstance(shared, nn.Module) else list(shared)
    for p in params:
        if not isinstance(p, Tensor):
            raise TypeError(f"`shared` must hold tensors, got {type(p).__name__}")
    return {id(p) for p in params}


def _accumulate(params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> None:
    """``p.grad += g`` for every pair, creating ``p.grad`` where it is ``None`` (a ``None``
    gradient leaves its parameter alone)."""
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
    for p, g in zip(params, grads, strict=True):
        if p.grad is None:
            # Own copy: autograd may hand one tensor to several parameters (an addition passes its
            # incoming gradient to both operands) or a view of the combined update; adding into
            # such a .grad in place would double-count or rewrite the wrapper's own record.
            p.grad = g.detach().to(p.dtype).clone()


def _add_to_sum(sums: dict[tuple[int, int], Tensor], key: tuple[int, int], grad: Tensor) -> None:
    sums[key] = grad if key not in sums else sums[key] + grad


def _with_values(losses: Sequence[Tensor], values: Tensor) -> list[Tensor]:
    """Each loss with its value replaced by ``values[i]`` and its gradient unchanged.

    Strategies then weigh by the step's losses (accumulated over micro-batches, averaged over
    ranks) while the gradient flows through this micro-batch's own losses.
    """
    return [
        loss + (value.to(loss) - loss.detach()) for loss, value in zip(losses, values, strict=True)
    ]


def _detach_losses(losses: Sequence[Tensor]) -> Tensor:
    """The task losses as one float64 vector, on the first loss's device."""
    device = losses[0].device
    return torch.stack([t.detach().reshape(()).to(device) for t in losses]).to(torch.float64)


def _window_losses(window: _Window, step: StepTasks, detached: Tensor) -> Tensor:
    """Every task's loss summed over the window's micro-batches, this one included (0 where a
    task has not been present)."""
    total = (
        torch.zeros(len(step.names), dtype=torch.float64, device=detached.device)
        if window.losses is None
        else window.losses.clone()
    )
    total[torch.as_tensor(step.present, device=detached.device)] += detached
    return total


def _union(a: np.ndarray | None, b: np.ndarray) -> np.ndarray:
    return b if a is None or np.array_equal(a, b) else np.union1d(a, b)


def _add_rows(
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


def _spread(weights: Tensor, step: StepTasks, present: np.ndarray | None = None) -> Tensor:
    """Per-present-task weights as one entry per task (NaN for absent tasks)."""
    present = step.present if present is None else present
    if len(present) == len(step.names):
        return weights
    full = torch.full((len(step.names),), math.nan, dtype=weights.dtype, device=weights.device)
    full[torch.as_tensor(present, device=weights.device)] = weights
    return full
