"""``MTLOptimizer``: wraps any ``torch.optim.Optimizer`` and combines task losses with a strategy."""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .engine import Partition, partition_parameters, reached_parameters, task_gradients
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
        diagnostics: compute gradient norms and cosines for :attr:`last_step` (gradient strategies).
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
        detached = torch.stack([t.detach().reshape(()) for t in tensors]).to(torch.float64)
        if window.skipped:
            return window.info  # type: ignore[return-value]
        bad = [n for n, v in zip(names, detached.tolist(), strict=True) if not math.isfinite(v)]
        if bad:
            return self._nonfinite(names, detached, f"non-finite loss for task(s) {', '.join(bad)}")
        if isinstance(self.strategy, TokenStrategy):
            self.strategy.observe(tensors)
        if isinstance(self._combiner, LossStrategy):
            if features is not None:
                raise ValueError(
                    f"{self._combiner.info.name} is a loss strategy: representation mode "
                    "(features=) applies to gradient strategies only"
                )
            return self._backward_scalarized(names, tensors, detached)
        tensors = [self._combiner.transform_loss(i, t.reshape(())) for i, t in enumerate(tensors)]
        if features is not None:
            return self._backward_representation(names, tensors, detached, features)
        return self._backward_jacobian(names, tensors, detached)

    def _backward_scalarized(
        self, names: list[str], losses: list[Tensor], detached: Tensor
    ) -> StepInfo:
        assert isinstance(self._combiner, LossStrategy)
        window = self._window
        stacked = torch.stack([loss.reshape(()) for loss in losses])
        scalarized = self._combiner.scalarize(stacked)
        params = self._trainable()
        grads = torch.autograd.grad(scalarized.loss, params, allow_unused=True)
        present = [(p, g) for p, g in zip(params, grads, strict=True) if g is not None]
        bad = _first_nonfinite([g for _, g in present])
        if bad is not None:
            return self._nonfinite(names, detached, "non-finite gradient of the combined loss")
        _accumulate([p for p, _ in present], [g for _, g in present])
        window.losses = detached if window.losses is None else window.losses + detached
        window.commit = scalarized.commit
        window.info = StepInfo(list(names), window.losses.clone(), scalarized.weights.detach())
        return window.info

    def _backward_jacobian(
        self, names: list[str], losses: list[Tensor], detached: Tensor
    ) -> StepInfo:
        assert isinstance(self._combiner, GradientStrategy)
        window = self._window
        partition = self._partition_for(losses)
        grads = task_gradients(losses, partition)
        finite_rows = _finite_rows(grads.jacobian)
        for i, name in enumerate(names):
            if not finite_rows[i] or _first_nonfinite(grads.specific[i]) is not None:
                return self._nonfinite(names, detached, f"non-finite gradient for task {name!r}")

        jacobian = grads.jacobian if window.jacobian is None else window.jacobian + grads.jacobian
        losses_sum = detached if window.losses is None else window.losses + detached
        combined = self._combiner.combine(jacobian, losses_sum.to(jacobian.device))
        if not _finite_rows(combined.direction[None])[0]:
            return self._nonfinite(
                names, detached, f"{self._combiner.info.name} produced a non-finite update"
            )

        delta = (
            combined.direction if window.written is None else combined.direction - window.written
        )
        _accumulate(partition.shared, _unflatten(delta, partition.shared))
        for params, task_grads in zip(partition.specific, grads.specific, strict=True):
            _accumulate(params, task_grads)  # type: ignore[arg-type]
        window.jacobian, window.losses, window.written = jacobian, losses_sum, combined.direction
        window.commit = combined.commit
        window.info = self._gradient_info(names, losses_sum, jacobian, combined)
        return window.info

    def _backward_representation(
        self, names: list[str], losses: list[Tensor], detached: Tensor, features: Tensor
    ) -> StepInfo:
        assert isinstance(self._combiner, GradientStrategy)
        if not self._combiner.supports_representation:
            raise ValueError(f"{self._combiner.info.name} does not support representation mode")
        if not isinstance(features, Tensor) or not features.requires_grad:
            raise ValueError("features must be a tensor that requires grad (the trunk's output)")
        window = self._window
        partition = self._partition_for(losses, features=features)
        inputs = [features]
        per_task = []
        for i, loss in enumerate(losses):
            grads = torch.autograd.grad(
                loss,
                [*inputs, *partition.specific[i]],
                retain_graph=True,
                allow_unused=True,
                materialize_grads=True,
            )
            per_task.append(grads)
        jacobian = torch.stack([grads[0].reshape(-1) for grads in per_task])
        finite_rows = _finite_rows(jacobian)
        for i, name in enumerate(names):
            if not finite_rows[i] or _first_nonfinite(per_task[i][1:]) is not None:
                return self._nonfinite(names, detached, f"non-finite gradient for task {name!r}")
        combined = self._combiner.combine(jacobian, detached.to(jacobian.device))
        trunk = torch.autograd.grad(
            features,
            partition.shared,
            grad_outputs=combined.direction.view_as(features),
            allow_unused=True,
            materialize_grads=True,
        )
        if _first_nonfinite(trunk) is not None:
            return self._nonfinite(
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
        window = self._window
        info = window.info
        if window.skipped:
            self._window = _Window()
            self.last_step = info
            return info
        if window.commit is not None:
            window.commit()
        self.optimizer.step()
        self._window = _Window()
        self.last_step = info
        if isinstance(self.strategy, TokenStrategy):
            self.strategy.after_step()
        if closure is not None and getattr(self._combiner, "needs_losses_after_step", False):
            with torch.no_grad():
                self.update(closure())
        return info

    def update(self, losses: Losses) -> None:
        """Feed the losses of the same batch, re-evaluated after :meth:`step`, to strategies that
        learn from them (FAMO). ``step(closure)`` does this by itself."""
        if not getattr(self._combiner, "needs_losses_after_step", False):
            raise TypeError(f"{self._combiner.info.name} does not learn from post-step losses")
        values = list(losses.values()) if isinstance(losses, Mapping) else list(losses)
        self._combiner.update(
            torch.stack([torch.as_tensor(v).detach().reshape(()) for v in values])
        )  # type: ignore[union-attr]

    # State --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "strategy": self.strategy.state_dict(),
            "task_names": self._task_names,
        }

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
        self._task_names = state_dict.get("task_names")
        self._window = _Window()

    # Helpers ------------------------------------------------------------------------------------
    def _trainable(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _partition_for(self, losses: list[Tensor], features: Tensor | None = None) -> Partition:
        trainable = self._trainable()
        key = (len(losses), features is not None, *map(id, trainable))
        if self._partition is None or key != self._partition_key:
            shared_ids = self._shared_ids
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
            partition, multiply_reached = partition_parameters(
                losses, trainable, shared_ids, own, owners
            )
            if shared_ids is not None and multiply_reached:
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

    def _nonfinite(self, names: list[str], losses: Tensor, reason: str) -> StepInfo:
        if self.nonfinite == "raise":
            raise FloatingPointError(
                f"{reason}; nothing was changed (use nonfinite='skip' to skip)"
            )
        info = StepInfo(list(names), losses, skipped=True, reason=reason)
        self._window = _Window(skipped=True, info=info)
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


def _finite_rows(matrix: Tensor) -> list[bool]:
    """Whether each row is finite. A row's sum is NaN or infinite if any entry is (one reduction,
    no T×P mask); a finite row whose sum overflows is re-checked exactly."""
    sums_finite = torch.isfinite(matrix.sum(dim=1)).tolist()
    return [ok or bool(torch.isfinite(matrix[i]).all()) for i, ok in enumerate(sums_finite)]


def _first_nonfinite(grads: Sequence[Tensor | None]) -> int | None:
    present = [(i, g) for i, g in enumerate(grads) if g is not None]
    if not present:
        return None
    norms = torch.stack(
        [n.double() for n in torch._foreach_norm([g for _, g in present], math.inf)]
    )
    finite = torch.isfinite(norms)
    if bool(finite.all()):
        return None
    return present[int((~finite).nonzero()[0])][0]
