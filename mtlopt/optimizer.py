"""``MTLOptimizer``: wraps any ``torch.optim.Optimizer`` and combines task losses with a strategy."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from . import hooks
from .amp import LossScaling
from .autogram import BufferPool, engine_serves, gramian_engine_strategies
from .bilevel import within_step
from .distributed import ReplicaError, Replicas
from .finite import all_finite
from .multi import OptimizerChain, delegating_optimizer_init
from .partition import Partition, Reach
from .paths import JacobianPath, RepresentationPath, ScalarizedPath
from .paths.gramian import ENGINES
from .registry import create
from .stepinfo import StepInfo
from .strategies.base import (
    GradientStrategy,
    LossStrategy,
    Strategy,
    TokenStrategy,
)
from .tasks import Losses, StepTasks, check_names, read_losses
from .window import Window, detach_losses, window_losses, with_values

__all__ = ["MTLOptimizer", "StepInfo"]

NonFinite = Literal["raise", "skip"]
Engine = Literal["auto", "jacobian", "gramian"]
_SAVED = ("optimizer", "strategy", "strategy_name", "task_names")


class MTLOptimizer(JacobianPath, RepresentationPath, ScalarizedPath, torch.optim.Optimizer):
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
        engine: how a gradient strategy whose weights come from the Gramian ``G = J Jᵀ`` alone
            (MGDA, UPGrad, DualProj, Nash-MTL, FairGrad, IMTL-G, Aligned-MTL, CAGrad, PCGrad,
            GradVac, NTKMTL, ...) gets ``G``. ``"auto"`` (default): the Gramian engine
            (:mod:`mtlopt.autogram`: ``G`` of the shared linear layers from their inputs and
            output gradients, found on the graph, without forming ``J``) where it serves the step
            and does less work than the Jacobian path (:func:`mtlopt.autogram.engine_pays`), with
            the same result to rounding; ``"jacobian"``: never the engine; ``"gramian"``: the
            engine wherever it serves the step (for its memory: no T × P ``J``), and a strategy it
            cannot serve is an error.
            :attr:`StepInfo.engine` says which path took each step.
        jacobian_rows: for the same strategies, on a step the Gramian engine does not take, hold
            at most this many rows of ``J`` (:mod:`mtlopt.chunked`): ``G`` block by block, each
            later task's gradient formed again for its column (about T + T²/(2k) backward passes
            instead of T), the update by one backward of ``Σ_i w_i L_i``. Memory for time, where
            the T × P ``J`` does not fit; the same steps to rounding. One backward per step
            (gradient accumulation is refused); under torch.distributed the whole ``J`` is
            formed (its rows are averaged across ranks); ``None`` (default): the whole ``J``.
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
        engine: Engine = "auto",
        jacobian_rows: int | None = None,
        **strategy_kwargs: Any,
    ) -> None:
        if isinstance(optimizer, (list, tuple)):
            optimizer = OptimizerChain(*optimizer)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, MTLOptimizer):
            raise TypeError("the optimizer is already an MTLOptimizer")
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        if jacobian_rows is not None and (
            isinstance(jacobian_rows, bool) or not isinstance(jacobian_rows, int) or jacobian_rows < 1
        ):
            raise ValueError(f"jacobian_rows must be a positive int or None, got {jacobian_rows!r}")
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
        self._objective_closed: dict[tuple[int, ...], bool] = {}
        self._tasks: tuple[str, ...] | None = None
        self._window = Window()
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
        self._signal_sources: dict[str, Callable[[], Any]] = {}  # opt.observe(x=function)
        self.engine = engine
        self._engine_declined: tuple[int, int] | None = None
        self._engine_pool = BufferPool()
        self._jacobian_rows = jacobian_rows
        if engine == "gramian":
            self._require_gramian_strategy(
                "engine='gramian'", "use engine='jacobian' (or leave 'auto')"
            )
        if jacobian_rows is not None:
            self._require_gramian_strategy("jacobian_rows=", "leave jacobian_rows unset")

        # The torch.optim.Optimizer contract, sharing the wrapped optimizer's groups and state.
        delegating_optimizer_init(self, optimizer.defaults)
        if names is not None:
            self._fix_tasks(names)
        else:
            self._join_strategy_parameters()
        if isinstance(strategy, TokenStrategy):
            strategy.attach(self)
        if hasattr(self._combiner, "bind_optimizer"):  # i18c: Auto-λ's virtual step reads the lr
            self._combiner.bind_optimizer(optimizer)

    def _require_gramian_strategy(self, option: str, remedy: str) -> None:
        """``option`` (``engine='gramian'``, ``jacobian_rows=``) serves only strategies whose
        weights come from ``G`` alone: any other is an error here, saying ``remedy``."""
        if isinstance(self.strategy, TokenStrategy):
            raise ValueError(
                f"{option} does not serve {self.strategy.info.name}: its task streams take "
                f"their own gradient path; {remedy}"
            )
        if not engine_serves(self._combiner):
            raise ValueError(
                f"{option} serves strategies whose weights come from the Gramian G = J Jᵀ "
                f"alone ({', '.join(gramian_engine_strategies())}); "
                f"{self._combiner.info.name} reads J itself: {remedy}"
            )

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
        self._window = Window()

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
        self.strategy.name_tasks(names)
        if self._combiner is not self.strategy:
            self._combiner.name_tasks(names)
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
        if self._replicas is not None:
            # Rank 0's strategy state, once, before anything of this step: the same point on every
            # rank whatever its input (strategies built later, at the first step, are built
            # deterministically from the task count).
            self._sync_replicas_once()
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
        hooks.ready(self)  # a closure, other batches or a validation signal the strategy needs
        step = read_losses(losses, self._tasks)
        self.strategy.check_num_tasks(len(step.names))
        if self._window_is_stale():
            self._window = Window()
        window = self._window
        if window.skipped:
            return window.info  # type: ignore[return-value]
        replicas = self._replicas
        if replicas is not None and features is not None:
            raise NotImplementedError(
                "representation mode (features=) under torch.distributed is not supported: "
                "each rank's features are different samples, so their gradients cannot be averaged"
            )
        detached = detach_losses(step.losses)
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
        """Gradient strategies: each present task's loss (at the window's accumulated value,
        through the strategy's loss transform, scaled for a GradScaler) to the Jacobian path or,
        with ``features``, to the representation path."""
        window = self._window
        present = step.present
        tensors = list(step.losses)
        if window.losses is not None:
            tensors = with_values(tensors, window_losses(window, step, detached)[present])
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

    # Step ---------------------------------------------------------------------------------------
    def step(  # type: ignore[override]
        self,
        losses: Losses | Callable[[], Losses] | None = None,
        closure: Callable[[], Losses] | None = None,
    ) -> StepInfo | None:
        """Combine (if ``losses`` are given, back-propagate them first) and update the parameters.

        ``losses`` may also be a closure returning the task losses, as with ``torch.optim``'s
        ``step(closure)`` (also accepted by keyword, ``step(closure=fn)``); it is evaluated with
        gradients enabled.

        Strategies with a closure hook (:mod:`mtlopt.hooks`) call it more than once: MoDo and
        SDMGrad once per independent batch (each call must draw a new batch; or pass
        ``step([losses_1, losses_2, losses_3])``), F-MTL and SAMO once more per task at perturbed
        parameters (each call must compute the same batch's losses).
        """
        if closure is not None:
            if losses is not None:
                raise TypeError("pass the losses or a closure, not both")
            losses = closure
        closure = losses if callable(losses) else None
        losses, feed = hooks.prepare(self, losses, closure)
        if losses is not None:
            with hooks.feeding(self._combiner, feed), within_step(closure):  # i18c: Auto-λ
                self.backward(losses)  # type: ignore[arg-type]
            if self._scaling is not None and self._scaling.enabled:
                # The scaler unscales, checks for overflow and, unless it finds one, calls step()
                # again, without losses (below).
                updates = self._updates
                self._scaling.scaler.step(self)
                if self._updates > updates:
                    self._after_step(closure)
                else:
                    self._window = Window()  # the scaler skipped this step
                return self.last_step
        if self._scaling is not None:
            self._scaling.check_step_allowed(self)
        window = self._window
        info = window.info
        if window.skipped:
            self._window = Window()
            self.last_step = info
            return info
        if window.commit is not None:
            window.commit()
        self.optimizer.step()
        self._updates += 1
        self._last_present = window.present
        self._window = Window()
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
        after = detach_losses([torch.as_tensor(given[name]) for name in wanted])
        if self._replicas is not None:
            (after,) = self._replicas.mean([after])
        restriction = None if len(wanted) == len(self._tasks) else self._last_present
        with self._combiner.restricted_to(restriction):
            self._combiner.update(after)  # type: ignore[union-attr]
        self._awaiting_update = False

    def observe(self, **signals: Any) -> None:
        """Feed a validation signal to the strategies that read one (CoBa: ``validation_losses``,
        PIVRG: ``scores``): one value per task (a dict, a sequence in task order, a vector), kept
        in the strategy's state; a function instead is called before every step (see
        :mod:`mtlopt.hooks.signal`)."""
        hooks.observe(self, signals)

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
        self._window = Window()

    # Helpers ------------------------------------------------------------------------------------


    def _window_is_stale(self) -> bool:
        """Whether someone else zeroed the gradients since the window began (``model.zero_grad()``
        in place of ``opt.zero_grad()``): the window's record of ``.grad`` is then void."""
        marker = self._window.marker
        if marker is None:
            return False
        if marker.grad is None:
            return True
        return self._window.skipped and not bool(torch.isinf(marker.grad).any())











def _parameter_ids(shared: Iterable[Tensor] | nn.Module) -> set[int]:
    params = list(shared.parameters()) if isinstance(shared, nn.Module) else list(shared)
    for p in params:
        if not isinstance(p, Tensor):
            raise TypeError(f"`shared` must hold tensors, got {type(p).__name__}")
    return {id(p) for p in params}
















