"""``MTLOptimizer``: wraps any ``torch.optim.Optimizer`` and combines task losses with a strategy."""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .amp import LossScaling
from .distributed import Replicas
from .engine import (
    Partition,
    compiled_graph,
    partition_parameters,
    reached_parameters,
    task_gradients,
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

Losses = Sequence[Tensor] | Mapping[str, Tensor]
NonFinite = Literal["raise", "skip"]


@dataclass
class StepInfo:
    """Diagnostics of the last optimizer step (``MTLOptimizer.last_step``)."""

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

    def as_dict(self) -> dict[str, Any]:
        """Plain Python numbers keyed by task name, for loggers."""
        out: dict[str, Any] = {"skipped": self.skipped}
        for i, name in enumerate(self.task_names):
            out[f"loss/{name}"] = float(self.losses[i])
            if self.weights is not None:
                out[f"weight/{name}"] = float(self.weights[i])
            if self.gradient_norms is not None:
                out[f"grad_norm/{name}"] = float(self.gradient_norms[i])
        if self.cosines is not None:
            for i, a in enumerate(self.task_names):
                for j in range(i + 1, len(self.task_names)):
                    out[f"cos/{a}~{self.task_names[j]}"] = float(self.cosines[i, j])
        return out


@dataclass
class _Window:
    """What has been accumulated since the last step: per-task gradients, losses, pending state."""

    jacobian: Tensor | None = None
    losses: Tensor | None = None
    written: Tensor | None = None
    written_own: dict[tuple[int | None, int], Tensor] = field(default_factory=dict)
    commit: Commit | None = None
    info: StepInfo | None = None
    skipped: bool = False


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
        strategy: a registered name (see :func:`mtlopt.available`) or a strategy instance.
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
        optimizer: torch.optim.Optimizer,
        strategy: str | Strategy = "ew",
        *,
        shared: Iterable[Tensor] | nn.Module | None = None,
        nonfinite: NonFinite = "raise",
        diagnostics: bool = True,
        scaler: torch.amp.GradScaler | None = None,
        process_group: Any = None,
        **strategy_kwargs: Any,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, MTLOptimizer):
            raise TypeError("the optimizer is already an MTLOptimizer")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        if isinstance(strategy, str):
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
        self._task_names: list[str] | None = None
        self._window = _Window()
        self.last_step: StepInfo | None = None
        self._scaling = LossScaling(scaler) if scaler is not None else None
        self._replicas = Replicas.detect(process_group)
        self._replicas_synced = False
        self._warned: set[str] = set()
        self._updates = 0
        self._own_ids = {id(p) for p in self._combiner.parameters()}

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
        for parameter in strategy.parameters():
            self.optimizer.add_param_group({"params": [parameter], "weight_decay": 0.0})
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
        return self._task_names

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._window = _Window()

    def __repr__(self) -> str:
        return f"MTLOptimizer({self.strategy!r}, {self.optimizer!r})"

    # Backward -----------------------------------------------------------------------------------
    def backward(self, losses: Losses, *, features: Tensor | None = None) -> StepInfo:
        """Back-propagate the task losses; the shared gradients hold the combined update afterwards.

        Call it several times before :meth:`step` to accumulate gradients over micro-batches: the
        per-task gradients are accumulated and the strategy combines their sums.

        ``features`` switches a gradient strategy to representation mode (MGDA-UB style, LibMTL's
        ``rep_grad``): per-task gradients are taken with respect to this shared representation (one
        cheap backward per task through the heads), combined, and back-propagated through the trunk
        once. The shared parameters are then those that produce ``features``. In this mode each
        ``backward`` call combines its own micro-batch (the trunk graph of each is needed).
        """
        names, tensors = self._validate(losses)
        window = self._window
        if window.skipped:
            return window.info  # type: ignore[return-value]
        replicas = self._replicas
        if replicas is not None:
            if features is not None:
                raise NotImplementedError(
                    "representation mode (features=) under torch.distributed is not supported: "
                    "each rank's features are different samples, so their gradients cannot be averaged"
                )
            self._sync_replicas_once()
        detached = _detach_losses(tensors)
        # Under torch.distributed the losses are checked after their average across ranks, so that
        # every rank takes the same decision.
        if replicas is None and not _all_finite(detached):
            return self._nonfinite_loss(names, detached)
        if isinstance(self.strategy, TokenStrategy):
            self.strategy.observe(tensors)
        if isinstance(self._combiner, LossStrategy):
            if features is not None:
                raise ValueError(
                    f"{self._combiner.info.name} is a loss strategy: representation mode "
                    "(features=) applies to gradient strategies only"
                )
            if replicas is not None:
                (detached,) = replicas.mean([detached])
                if not _all_finite(detached):
                    return self._nonfinite_loss(names, detached)
            return self._backward_scalarized(names, tensors, detached)
        if window.losses is not None:
            tensors = _with_values(tensors, window.losses + detached)
        tensors = [self._combiner.transform_loss(i, t.reshape(())) for i, t in enumerate(tensors)]
        scale = 1.0
        if self._scaling is not None:
            tensors, scale = self._scaling.scale(tensors)
        if features is not None:
            return self._backward_representation(names, tensors, detached, features, scale)
        return self._backward_jacobian(names, tensors, detached, scale)

    def _backward_scalarized(
        self, names: list[str], losses: list[Tensor], detached: Tensor
    ) -> StepInfo:
        assert isinstance(self._combiner, LossStrategy)
        window = self._window
        device = losses[0].device
        if window.losses is not None and not self._combiner.linear_in_losses:
            self._warn_once(
                "nonlinear-accumulation",
                f"{self._combiner.info.name}'s task weights depend on the current losses: with "
                "gradient accumulation each micro-batch is weighted by the losses accumulated so "
                "far (the last one by the step's total), not by the step's total losses",
            )
        seen = detached if window.losses is None else window.losses + detached
        stacked = torch.stack(_with_values([loss.reshape(()).to(device) for loss in losses], seen))
        scalarized = self._combiner.scalarize(stacked)
        objective = scalarized.loss
        if self._scaling is not None:
            (objective,), _ = self._scaling.scale([objective])
        params = self._trainable()
        grads = torch.autograd.grad(objective, params, allow_unused=True)
        present = [(p, g) for p, g in zip(params, grads, strict=True) if g is not None]
        grads_present = [g for _, g in present]
        if self._replicas is not None:
            grads_present = self._replicas.mean(grads_present)
        if not _finite_tensors(grads_present):
            return self._bad_gradient(names, detached, "non-finite gradient of the combined loss")
        params_present = [p for p, _ in present]
        _accumulate(params_present, self._correct_own(params_present, grads_present))
        window.losses = seen
        window.commit = scalarized.commit
        window.info = StepInfo(list(names), seen.clone(), scalarized.weights.detach())
        return window.info

    def _backward_jacobian(
        self, names: list[str], losses: list[Tensor], detached: Tensor, scale: float
    ) -> StepInfo:
        assert isinstance(self._combiner, GradientStrategy)
        window = self._window
        partition = self._partition_for(losses, names)
        grads = task_gradients(losses, partition)
        jacobian, specific = grads.jacobian, grads.specific
        if scale != 1.0:
            jacobian.mul_(1.0 / scale)  # exact: GradScaler's scales are powers of two
        if self._replicas is not None:
            jacobian, specific, detached = self._average(jacobian, specific, detached)
            if not _all_finite(detached):
                return self._nonfinite_loss(names, detached)
        for name, finite in zip(names, _finite_tasks(jacobian, specific), strict=True):
            if not finite:
                return self._bad_gradient(names, detached, f"non-finite gradient for task {name!r}")

        jacobian = jacobian if window.jacobian is None else window.jacobian + jacobian
        losses_sum = detached if window.losses is None else window.losses + detached
        try:
            combined = self._combiner.combine(jacobian, losses_sum.to(jacobian.device))
        except FloatingPointError as error:
            return self._nonfinite(names, detached, str(error))
        if not _finite_tasks(combined.direction[None], [[]])[0]:
            return self._nonfinite(
                names, detached, f"{self._combiner.info.name} produced a non-finite update"
            )

        delta = (
            combined.direction if window.written is None else combined.direction - window.written
        )
        if scale != 1.0:
            delta = delta * scale  # .grad holds scaled gradients until scaler.unscale_
        _accumulate(partition.shared, _unflatten(delta, partition.shared))
        for task, (params, grads_of_task) in enumerate(
            zip(partition.specific, specific, strict=True)
        ):
            _accumulate(params, self._correct_own(params, grads_of_task, task))  # type: ignore[arg-type]
        window.jacobian, window.losses, window.written = jacobian, losses_sum, combined.direction
        window.commit = combined.commit
        window.info = self._gradient_info(names, losses_sum, jacobian, combined)
        return window.info

    def _correct_own(
        self, params: Sequence[Tensor], grads: Sequence[Tensor], task: int | None = None
    ) -> list[Tensor]:
        """Gradients of the strategy's own parameters (UW's log-variances, IMTL's loss scales) as
        corrections of what earlier micro-batches of the step wrote.

        Those gradients depend on the loss values only (``∂(e^{-s} L + s)/∂s``), and each
        micro-batch computes them at the step's losses so far (:func:`_with_values`): writing the
        difference leaves ``.grad`` holding the gradient at the step's total losses, with the
        regularizer ``+ s`` counted once, not once per micro-batch. In the gradient path each
        task's gradient of an own parameter (IMTL's scales tensor holds one entry per task) is
        tracked apart (``task``).
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
        self, jacobian: Tensor, specific: list[list[Tensor | None]], losses: Tensor
    ) -> tuple[Tensor, list[list[Tensor | None]], Tensor]:
        """All ranks' mean of the per-task gradients and losses, in one collective."""
        assert self._replicas is not None
        flat = [g for task in specific for g in task if g is not None]
        averaged = self._replicas.mean([jacobian, losses.to(jacobian.dtype), *flat])
        jacobian, mean_losses, rest = averaged[0], averaged[1], iter(averaged[2:])
        specific = [[None if g is None else next(rest) for g in task] for task in specific]
        return jacobian, specific, mean_losses.to(torch.float64)

    def _backward_representation(
        self,
        names: list[str],
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
        partition = self._partition_for(losses, names, features=features)
        per_task = [
            torch.autograd.grad(
                loss,
                [features, *partition.specific[i]],
                retain_graph=True,
                allow_unused=True,
                materialize_grads=True,
            )
            for i, loss in enumerate(losses)
        ]
        jacobian = torch.stack([grads[0].reshape(-1) for grads in per_task])
        if scale != 1.0:
            jacobian.mul_(1.0 / scale)
        own_grads = [list(grads[1:]) for grads in per_task]
        for name, finite in zip(names, _finite_tasks(jacobian, own_grads), strict=True):
            if not finite:
                return self._bad_gradient(names, detached, f"non-finite gradient for task {name!r}")
        try:
            combined = self._combiner.combine(jacobian, detached.to(jacobian.device))
        except FloatingPointError as error:
            return self._nonfinite(names, detached, str(error))
        trunk = torch.autograd.grad(
            features,
            partition.shared,
            grad_outputs=(combined.direction * scale).view_as(features),
            allow_unused=True,
            materialize_grads=True,
        )
        if not _finite_tensors(trunk):
            return self._bad_gradient(
                names, detached, f"{self._combiner.info.name} produced a non-finite update"
            )
        _accumulate(partition.shared, trunk)
        for params, grads in zip(partition.specific, per_task, strict=True):
            _accumulate(params, grads[1:])
        window.losses = detached if window.losses is None else window.losses + detached
        window.commit = combined.commit
        window.info = self._gradient_info(names, window.losses, jacobian, combined)
        return window.info

    def _gradient_info(
        self, names: list[str], losses: Tensor, jacobian: Tensor, combined: Combined
    ) -> StepInfo:
        weights = combined.weights
        info = StepInfo(list(names), losses.clone(), None if weights is None else weights.detach())
        if self.diagnostics and jacobian.shape[1] > 0:
            computed = combined.gramian if combined.gramian is not None else gramian_of(jacobian)
            gramian = torch.from_numpy(computed)
            norms = gramian.diagonal().clamp_min(0).sqrt()
            denominator = torch.outer(norms, norms)
            info.gradient_norms = norms
            info.cosines = torch.where(denominator > 0, gramian / denominator, torch.zeros(()))
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
        self._window = _Window()
        self.last_step = info
        if isinstance(self.strategy, TokenStrategy):
            self.strategy.after_step()
        self._after_step(closure)
        return info

    def _after_step(self, closure: Callable[[], Losses] | None) -> None:
        if closure is not None and getattr(self._combiner, "needs_losses_after_step", False):
            with torch.no_grad():
                self.update(closure())

    def update(self, losses: Losses) -> None:
        """Feed the losses of the same batch, re-evaluated after :meth:`step`, to strategies that
        learn from them (FAMO). ``step(closure)`` does this by itself."""
        if not getattr(self._combiner, "needs_losses_after_step", False):
            raise TypeError(f"{self._combiner.info.name} does not learn from post-step losses")
        values = list(losses.values()) if isinstance(losses, Mapping) else list(losses)
        after = _detach_losses([torch.as_tensor(v) for v in values])
        if self._replicas is not None:
            (after,) = self._replicas.mean([after])
        self._combiner.update(after)  # type: ignore[union-attr]

    # State --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {
            "optimizer": self.optimizer.state_dict(),
            "strategy": self.strategy.state_dict(),
            "task_names": self._task_names,
        }
        if self._scaling is not None:
            state["scaler"] = self._scaling.scaler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        missing = {"optimizer", "strategy"} - set(state_dict)
        if missing:
            raise KeyError(
                f"not an MTLOptimizer state dict (missing {sorted(missing)}); to load a plain "
                "optimizer's state use opt.optimizer.load_state_dict(...)"
            )
        # The strategy first: DTME re-applies its expansion, which adds parameter groups that the
        # wrapped optimizer's saved state refers to.
        self.strategy.load_state_dict(state_dict["strategy"])
        self.optimizer.load_state_dict(state_dict["optimizer"])
        if self._scaling is not None and "scaler" in state_dict:
            self._scaling.scaler.load_state_dict(state_dict["scaler"])
        self._task_names = state_dict.get("task_names")
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

    def _trainable(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _partition_for(
        self, losses: list[Tensor], names: list[str], features: Tensor | None = None
    ) -> Partition:
        trainable = self._trainable()
        key = (len(losses), features is not None, *map(id, trainable))
        if self._partition is None or key != self._partition_key:
            shared_ids = self._shared_ids
            if shared_ids is not None:
                known = {id(p) for group in self.param_groups for p in group["params"]}
                if not shared_ids <= known:
                    raise ValueError(
                        f"{len(shared_ids - known)} tensor(s) in `shared` are not parameters of "
                        "the wrapped optimizer"
                    )
            if features is not None:
                reached = reached_parameters(features, trainable)
                shared_ids = {id(trainable[i]) for i in reached}
            own = {id(p) for p in self._combiner.parameters()}
            owners = {}
            if isinstance(self.strategy, TokenStrategy):
                owners = {
                    id(p): task
                    for task, params in enumerate(self.strategy.task_parameters())
                    for p in params
                }
            compiled = len(losses) > 1 and compiled_graph(losses[0])
            if compiled and shared_ids is None:
                raise ValueError(
                    "the losses come out of a torch.compile'd model, whose backward is one opaque "
                    "graph node: every parameter looks reached by every task, so the shared "
                    "parameters cannot be found; pass them: MTLOptimizer(..., shared=model.trunk)"
                )
            partition, multiply_reached = partition_parameters(
                losses, trainable, shared_ids, own, owners
            )
            if shared_ids is not None and multiply_reached and not compiled:
                warnings.warn(
                    f"{len(multiply_reached)} parameter tensor(s) not in `shared` are reached by "
                    "several tasks; their gradient is the sum of those tasks' gradients",
                    stacklevel=4,
                )
            if not partition.shared and len(losses) > 1:
                warnings.warn(
                    "no shared parameters: no parameter of the optimizer is reached by two tasks, "
                    "so the strategy has nothing to combine",
                    stacklevel=4,
                )
            elif partition.blind and len(losses) > 1:
                blind = ", ".join(repr(names[i]) for i in partition.blind)
                warnings.warn(
                    f"task(s) {blind} reach none of the shared parameters: their gradient rows are "
                    "zero, which strategies that balance or normalise gradients (MGDA, IMTL, "
                    "Nash-MTL, ...) take as a task already at a stationary point",
                    stacklevel=4,
                )
            self._partition, self._partition_key = partition, key
        return self._partition

    def _validate(self, losses: Losses) -> tuple[list[str], list[Tensor]]:
        if isinstance(losses, Tensor):
            raise TypeError(
                "pass the task losses as a sequence or a dict of scalar tensors, not one tensor "
                "(use list(losses) for a vector of losses)"
            )
        if isinstance(losses, Mapping):
            names, tensors = [str(k) for k in losses], list(losses.values())
        else:
            tensors = list(losses)
            names = [f"task{i}" for i in range(len(tensors))]
        if not tensors:
            raise ValueError("no losses given")
        self.strategy.check_num_tasks(len(tensors))
        if self._task_names is not None and len(self._task_names) != len(tensors):
            raise ValueError(
                f"this optimizer has been stepping with {len(self._task_names)} tasks "
                f"({', '.join(self._task_names)}) but got {len(tensors)} losses"
            )
        for name, loss in zip(names, tensors, strict=True):
            if not isinstance(loss, Tensor):
                raise TypeError(f"loss of task {name!r} is a {type(loss).__name__}, not a tensor")
            if loss.numel() != 1:
                raise ValueError(
                    f"loss of task {name!r} has shape {tuple(loss.shape)}; losses must be scalars "
                    "(reduce it with .mean() or .sum())"
                )
            if not loss.requires_grad:
                raise ValueError(
                    f"loss of task {name!r} does not require grad: it has no gradient path to any "
                    "parameter (was it computed under torch.no_grad() or from detached tensors?)"
                )
        if self._task_names is None:
            self._task_names = names
        return names, tensors

    def _nonfinite_loss(self, names: list[str], losses: Tensor) -> StepInfo:
        bad = [n for n, v in zip(names, losses.tolist(), strict=True) if not math.isfinite(v)]
        return self._nonfinite(names, losses, f"non-finite loss for task(s) {', '.join(bad)}")

    def _bad_gradient(self, names: list[str], losses: Tensor, reason: str) -> StepInfo:
        """A non-finite gradient: an error (or a skip), or with a GradScaler an overflow."""
        if self._scaling is None or not self._scaling.enabled:
            return self._nonfinite(names, losses, reason)
        self._scaling.signal_overflow(self._trainable())
        info = StepInfo(
            list(names), losses, skipped=True, reason=f"{reason}: overflow, skipped by the scaler"
        )
        self._window = _Window(skipped=True, info=info)
        self.last_step = info
        return info

    def _nonfinite(self, names: list[str], losses: Tensor, reason: str) -> StepInfo:
        if self.nonfinite == "raise":
            raise FloatingPointError(
                f"{reason}; nothing was changed (use nonfinite='skip' to skip)"
            )
        info = StepInfo(list(names), losses, skipped=True, reason=reason)
        self._window = _Window(skipped=True, info=info)
        if self._scaling is not None and self._scaling.enabled:
            # The scaler must see the skip too (it refuses a step without any gradient checks).
            self._scaling.signal_overflow(self._trainable())
            self.last_step = info
        return info


def _parameter_ids(shared: Iterable[Tensor] | nn.Module) -> set[int]:
    params = list(shared.parameters()) if isinstance(shared, nn.Module) else list(shared)
    for p in params:
        if not isinstance(p, Tensor):
            raise TypeError(f"`shared` must hold tensors, got {type(p).__name__}")
    return {id(p) for p in params}


def _unflatten(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    pieces = vector.split([p.numel() for p in like])
    return [piece.view_as(p) for piece, p in zip(pieces, like, strict=True)]


def _accumulate(params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    """``p.grad += g`` for every pair, creating ``p.grad`` where it is ``None``."""
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


def _finite_tasks(jacobian: Tensor, specific: Sequence[Sequence[Tensor | None]]) -> list[bool]:
    """Whether each task's gradients (its row of ``J`` and those of its own parameters) are all
    finite, with one transfer to the host whatever the number of tasks.

    A row's sum and a tensor's largest magnitude are NaN or infinite if any entry is; a finite row
    whose sum overflows is re-checked exactly (the rare path)."""
    owned = [(task, g) for task, grads in enumerate(specific) for g in grads if g is not None]
    magnitudes = _largest_magnitudes([g for _, g in owned]).to(jacobian.device)
    values = torch.cat([jacobian.sum(dim=1).double(), magnitudes]).tolist()
    num_tasks = jacobian.shape[0]
    finite = [
        math.isfinite(v) or bool(torch.isfinite(jacobian[i]).all())
        for i, v in enumerate(values[:num_tasks])
    ]
    for (task, _), v in zip(owned, values[num_tasks:], strict=True):
        finite[task] = finite[task] and math.isfinite(v)
    return finite


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


def _all_finite(values: Tensor) -> bool:
    return bool(torch.isfinite(values).all())


def _finite_tensors(grads: Sequence[Tensor | None]) -> bool:
    """Whether every given tensor is finite (one transfer to the host)."""
    return all(math.isfinite(v) for v in _largest_magnitudes(grads).tolist())


def _largest_magnitudes(grads: Sequence[Tensor | None]) -> Tensor:
    """Each present tensor's largest |entry| in float64 (NaN or inf if it holds one), on one device."""
    present = [g for g in grads if g is not None]
    if not present:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack([n.double() for n in torch._foreach_norm(present, math.inf)])
