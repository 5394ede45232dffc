"""The small shared base every strategy stands on.

Three families, after torchjd's taxonomy:

* :class:`LossStrategy` maps the vector of task losses to one scalar objective (EW, UW, DWA, ...).
* :class:`GradientStrategy` maps the T×P matrix ``J`` of per-task shared gradients to one P-vector.
* :class:`GramianStrategy` is the common special case of a gradient strategy whose weights depend on
  ``J`` only through the Gramian ``G = J Jᵀ``: the weights are computed on the small T×T matrix (in
  float64, on the host) and the direction is ``wᵀ J``, so ``J`` is read twice in all.

State is functional: ``combine``/``scalarize`` never mutate the strategy. They return a ``commit``
callable that the optimizer runs once per optimizer step. Gradient accumulation can therefore combine
as often as it likes (after every micro-batch, so that gradient clipping sees the final gradient)
while stateful and random strategies advance exactly once per step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ..registry import StrategyInfo
from ..tasks import resolve_task
from ..wide import gram
from ._state import TaskAxes, decode, encode, put, take, task_count

Commit = Callable[[], None]
HeadExtra = Callable[[int, list[Tensor], list[Tensor | None]], list[Tensor | None]]
STRATEGY_KEY = "__strategy__"
"""The key under which a strategy's ``state_dict`` records the strategy's registered name."""


def _noop() -> None:
    return None


@dataclass
class Combined:
    """Result of combining per-task gradients."""

    direction: Tensor | None
    """The combined P-vector written to the shared parameters' gradients (``None`` only between
    :meth:`GramianStrategy.combine_gramian` and its caller forming it)."""
    weights: Tensor | None
    """Effective task weights (``direction = weights @ J``) where the method is linear in ``J``."""
    commit: Commit = _noop
    gramian: np.ndarray | None = None
    """``J Jᵀ`` (float64, host) when the strategy computed it, reused for the diagnostics."""
    head_weights: Tensor | None = None
    """Per task, a factor for the gradients of its own parameters (heads), where the reference
    code scales them (Nash-MTL and MGDA with ``weighted_heads=True``); ``None``: raw gradients."""
    head_extra: HeadExtra | None = None
    """Extra gradients for each task's own parameters (heads), added to what is written there
    (ConsMTL's consistency term); only from strategies with
    :attr:`GradientStrategy.adds_head_gradients`. Called once per present task, after the
    combination, as ``head_extra(task, params, grads)``: ``task`` in the full task order, the
    task's own parameters and its raw (unscaled) gradients of them (``None`` where not reached);
    it returns one unscaled gradient (or ``None``) per parameter."""


@dataclass
class Scalarized:
    """Result of scalarizing the task losses."""

    loss: Tensor
    """The scalar objective to back-propagate."""
    weights: Tensor
    """Effective task weights ``∂loss/∂L_i`` (detached), for diagnostics."""
    commit: Commit = _noop


class Strategy:
    """Common base: metadata, the task count, per-task state and its (de)serialization.

    Tasks may be absent from a step. The optimizer then calls the strategy inside
    :meth:`restricted_to` the present tasks: every state entry declared in ``_task_state`` is cut
    down to the present tasks' entries for the call, and what the step writes is put back into the
    full state, so an absent task's state is neither read nor advanced.
    """

    info: ClassVar[StrategyInfo]
    absent_tasks: ClassVar[str] = ""
    """What the strategy does when a task has no loss in a step (the catalogue shows it)."""

    def __init__(self, num_tasks: int | None = None) -> None:
        if num_tasks is not None and num_tasks < 1:
            raise ValueError(f"num_tasks must be at least 1, got {num_tasks}")
        self.num_tasks = num_tasks
        self._present: np.ndarray | None = None
        self.task_names: tuple[str, ...] | None = None
        """The optimizer's task names (set by :meth:`name_tasks`), for options naming a task."""

    def name_tasks(self, names: tuple[str, ...]) -> None:
        """Told the task names by the optimizer once it fixes them (options such as
        ``primary="seg"`` resolve against them)."""
        self.task_names = tuple(names)

    def task_index(self, task: str | int) -> int:
        """The index of a task named by the user (``primary="seg"`` or ``primary=0``) in the full
        task order: :func:`mtlopt.tasks.resolve_task` on this strategy's task names."""
        return resolve_task(task, self.task_names, self.num_tasks)

    def present_position(self, index: int) -> int | None:
        """Where task ``index`` (full order) sits among the rows of this step, ``None`` when the
        task is absent from it."""
        if self._present is None:
            return index
        found = np.nonzero(self._present == index)[0]
        return int(found[0]) if len(found) else None

    def build(self, num_tasks: int) -> None:
        """Fix the number of tasks (called by the optimizer once it knows them); strategies that
        own per-task parameters create them here."""
        self.check_num_tasks(num_tasks)
        self.num_tasks = num_tasks
        self._build()

    def _build(self) -> None:
        """Create what depends on the task count (``self.num_tasks`` is set)."""

    # State -------------------------------------------------------------------------------------
    _state_attrs: ClassVar[tuple[str, ...]] = ()
    """Names of the attributes that make up the strategy's state (saved by ``state_dict``)."""
    _task_state: ClassVar[dict[str, TaskAxes]] = {}
    """The state attributes indexed by task, with their task axes."""

    def state_dict(self) -> dict[str, Any]:
        """The state as tensors and Python primitives (``torch.load``'s default can read it)."""
        state = {name: encode(getattr(self, name)) for name in self._state_attrs}
        return {STRATEGY_KEY: self.info.name, **state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state; everything is checked first, and nothing changes if a check fails."""
        decoded = self._checked_state(state)
        for name, value in decoded.items():
            setattr(self, name, value)

    def _refuse_other_strategy(self, state: object) -> None:
        """A state saved by another strategy (or not a strategy's state at all) is a ValueError
        naming the strategy to load it into."""
        saved_by = state.get(STRATEGY_KEY) if isinstance(state, dict) else None
        if saved_by != self.info.name:
            raise ValueError(
                f"this state was saved by strategy {saved_by!r}, not {self.info.name!r}; load it "
                f"into an MTLOptimizer created with strategy={saved_by!r}"
            )

    def _checked_state(self, state: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(state, dict):
            raise TypeError(f"a strategy state must be a dict, got {type(state).__name__}")
        self._refuse_other_strategy(state)
        expected = set(self._state_attrs) | {STRATEGY_KEY}
        if set(state) != expected:
            missing, extra = expected - set(state), set(state) - expected
            raise KeyError(
                f"{self.info.name} state: missing {sorted(missing)}, unexpected {sorted(extra)}"
            )
        decoded = {name: decode(state[name]) for name in self._state_attrs}
        for name, spec in self._task_state.items():
            count = task_count(decoded[name], spec)
            if count is not None and self.num_tasks is not None and count != self.num_tasks:
                raise ValueError(
                    f"{self.info.name} state holds {name} for {count} tasks, this strategy has "
                    f"{self.num_tasks}"
                )
        return decoded

    @contextmanager
    def restricted_to(self, tasks: np.ndarray | None) -> Iterator[None]:
        """Within the block, per-task state holds only the entries of ``tasks`` (indices into the
        full task list, increasing); what the block writes there goes back into the full state.
        ``None`` means every task."""
        total = self.num_tasks
        if tasks is None or total is None or len(tasks) == total:
            yield
            return
        full = {name: getattr(self, name) for name in self._task_state}
        for name, spec in self._task_state.items():
            setattr(self, name, take(full[name], tasks, spec))
        self._present = tasks
        try:
            yield
        finally:
            for name, spec in self._task_state.items():
                part = getattr(self, name)
                setattr(self, name, put(full[name], part, tasks, total, spec))
            self._present = None

    def commit_restricted(self, tasks: np.ndarray | None, commit: Commit) -> Commit:
        """``commit`` run inside :meth:`restricted_to` ``tasks``."""
        if tasks is None:
            return commit

        def run() -> None:
            with self.restricted_to(tasks):
                commit()

        return run

    def parameters(self) -> list[torch.nn.Parameter]:
        """Learnable parameters the wrapped optimizer should train (e.g. UW's log-variances)."""
        return []

    def present_entries(self, values: Any) -> Any:
        """A per-task option (FAMO's ``min_losses``, STCH's preference) for the present tasks: a
        scalar as it is, a sequence cut down to the present tasks' entries."""
        if values is None or np.ndim(values) == 0 or self._present is None:
            return values
        return [values[i] for i in self._present]

    def check_num_tasks(self, num_tasks: int) -> None:
        if self._present is not None:
            if num_tasks != len(self._present):
                raise ValueError(
                    f"{self.info.name} is restricted to {len(self._present)} present tasks but "
                    f"got {num_tasks} rows"
                )
            return
        if self.num_tasks is not None and num_tasks != self.num_tasks:
            raise ValueError(
                f"{self.info.name} was created for {self.num_tasks} tasks but got {num_tasks} losses"
            )

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({params})"

    def hyperparameters(self) -> dict[str, Any]:
        return {}


class LossStrategy(Strategy):
    """Scalarizes the vector of task losses; costs one backward pass."""

    absent_tasks: ClassVar[str] = "the present tasks' losses are weighted; an absent task adds nothing"

    needs_losses_after_step: ClassVar[bool] = False
    """True for strategies that learn from the losses re-evaluated after the step (FAMO)."""
    linear_in_losses: ClassVar[bool] = True
    """False where the weights depend on the current loss values (GLS, STCH, FAMO): gradient
    accumulation then weighs each micro-batch by the losses accumulated so far."""

    def scalarize(self, losses: Tensor) -> Scalarized:
        raise NotImplementedError

    def update(self, losses_after_step: Tensor) -> None:
        """Learn from the task losses of the same batch re-evaluated after the optimizer step."""
        raise TypeError(f"{self.info.name} does not learn from post-step losses")


class GradientStrategy(Strategy):
    """Combines per-task gradients of the shared parameters, given as the rows of ``J``."""

    absent_tasks: ClassVar[str] = "the present tasks' rows of J are combined"

    supports_representation: ClassVar[bool] = True
    """Whether the strategy may combine gradients taken with respect to shared features."""
    adds_head_gradients: ClassVar[bool] = False
    """True where :meth:`combine` returns :attr:`Combined.head_extra`, taken from the step's graph
    after the combination: the Jacobian path then keeps the graph through the per-task backward
    passes (freed once the step's losses are dropped) and refuses torch.distributed (the extra
    gradients are not averaged across ranks)."""

    def transform_loss(self, index: int, loss: Tensor) -> Tensor:
        """A differentiable map applied to task ``index``'s loss before differentiation.

        Identity by default; IMTL's loss scaling ``e^s L − s`` overrides it. It acts on one task at
        a time so that each task's backward pass only walks that task's graph.
        """
        return loss

    def combine(self, jacobian: Tensor, losses: Tensor | None = None) -> Combined:
        """Combine without changing the strategy's state; ``commit`` advances it."""
        raise NotImplementedError

    def observe_columns(self, shared: list[Tensor], param_groups: list[dict]) -> None:
        """Told, before each combination, which shared parameter (in order) holds which columns
        of ``J`` and the wrapped optimizer's parameter groups; per-group aggregation
        (:class:`~mtlopt.strategies.grouped.Grouped`) splits ``J`` by them. Ignored by default."""

    @staticmethod
    def grouping(options: dict[str, Any]) -> str | None:
        """A ``group_by`` implied by a strategy's own options (GradVac's ``granularity``); it may
        pop them from ``options``. None by default."""
        return None

    def remap_columns(self, mapping: Tensor) -> None:
        """The shared parameters changed: new column ``c`` of ``J`` holds what old column
        ``mapping[c]`` held (``-1``: a parameter that was not shared). Strategies whose state is
        indexed by column (DB-MTL's EMA) follow their parameters here."""

    def aggregate(self, jacobian: Tensor, losses: Tensor | None = None) -> Tensor:
        """Combine the rows of a T×P matrix into one P-vector (advancing any state once).

        ``J`` is data: one that requires grad is detached, and the result never carries a graph
        (the solvers run on the host, outside autograd)."""
        jacobian = _as_matrix(jacobian)
        self.check_num_tasks(jacobian.shape[0])
        result = self.combine(jacobian, losses)
        result.commit()
        return result.direction


class GramianStrategy(GradientStrategy):
    """A gradient strategy whose task weights are a function of the Gramian ``G = J Jᵀ``.

    Subclasses implement :meth:`weigh`, which works on float64 NumPy arrays of size T×T. Those
    whose weights must tell the Gramian's rank from its rounding (eigenvalue cut-offs) implement
    :meth:`weigh_at_precision` instead, which also receives the rounding level of ``G``.
    """

    def weigh(self, gramian: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, Commit]:
        raise NotImplementedError

    def weigh_at_precision(
        self, gramian: np.ndarray, losses: np.ndarray | None, rounding: float
    ) -> tuple[np.ndarray, Commit]:
        """:meth:`weigh`, told that ``G``'s eigenvalues are exact only to ``rounding · λ_max``
        (:func:`gramian_rounding`); the default ignores it."""
        return self.weigh(gramian, losses)

    float64_gramian: ClassVar[bool] = False
    """Whether the weights need ``G`` formed in float64 whatever ``J``'s dtype (PCD: its
    normalisation divides by ``wᵀ G w``, which cancels where the constraints nearly conflict)."""

    def combine(self, jacobian: Tensor, losses: Tensor | None = None) -> Combined:
        return combine_through_gramian(self, jacobian, losses)

    def combine_gramian(
        self,
        gramian: np.ndarray,
        losses: Tensor | None,
        dtype: torch.dtype,
        width: int,
        device: torch.device,
    ) -> Combined:
        """The combination known from ``G`` alone (the Gramian engine's entry): the task
        weights, the commit and the heads' factors; ``direction`` is left ``None`` for the caller
        to form (``wᵀ J``, or one product per layer). ``dtype`` and ``width`` are ``J``'s, for
        the Gramian's rounding level."""
        loss_array = None if losses is None else losses.detach().double().cpu().numpy()
        precision = torch.float64 if self.float64_gramian else dtype
        rounding = gramian_rounding(precision, gramian.shape[0], width)
        weights, commit = self.weigh_at_precision(gramian, loss_array, rounding)
        if not np.all(np.isfinite(weights)):
            raise FloatingPointError(f"{self.info.name} produced non-finite task weights {weights}")
        w = torch.from_numpy(np.ascontiguousarray(weights)).to(device, dtype)
        return Combined(
            direction=None, weights=w, commit=commit, gramian=gramian, head_weights=self.head_weights(w)
        )

    def head_weights(self, weights: Tensor) -> Tensor | None:
        """Per task, a factor for the gradients of its own parameters (see
        :attr:`Combined.head_weights`); ``None``, the raw gradients, by default."""
        return None


def combine_through_gramian(strategy: Any, jacobian: Tensor, losses: Tensor | None) -> Combined:
    """The Jacobian path of a strategy whose combination is known from ``G`` alone (its
    ``combine_gramian`` and ``float64_gramian``): ``G`` of this ``J``, then ``direction = wᵀJ``."""
    combined = strategy.combine_gramian(
        gramian_of(jacobian, strategy.float64_gramian),
        losses,
        jacobian.dtype,
        jacobian.shape[1],
        jacobian.device,
    )
    assert combined.weights is not None
    combined.direction = combined.weights @ jacobian
    return combined


_known_gramian: ContextVar[tuple[Tensor, int, np.ndarray] | None] = ContextVar(
    "known_gramian", default=None
)


@contextmanager
def known_gramian(jacobian: Tensor, gramian: np.ndarray) -> Iterator[None]:
    """Within the block, :func:`gramian_of` of this very ``jacobian`` (not modified since)
    returns a copy of ``gramian`` instead of computing it again: the backward path forms ``G``
    once, for the finiteness check, the strategy and the diagnostics."""
    token = _known_gramian.set((jacobian, jacobian._version, gramian))
    try:
        yield
    finally:
        _known_gramian.reset(token)


def gramian_of(jacobian: Tensor, float64: bool = False) -> np.ndarray:
    """``J Jᵀ`` as a float64 host array (one matrix product on the device, one transfer).

    A finite float32 ``J`` with entries beyond ~1e19 overflows its Gramian: it is then recomputed
    in float64 (only in that case, to keep the common path at one pass in ``J``'s dtype), or
    always with ``float64``. A ``J`` that requires grad is read as data (detached)."""
    known = _known_gramian.get()
    if known is not None and known[0] is jacobian and known[1] == jacobian._version:
        return known[2].copy()
    jacobian = jacobian.detach()
    if float64 and jacobian.dtype != torch.float64:
        return host_gramian(gram(jacobian, dtype=torch.float64))
    gramian = host_gramian(gram(jacobian))
    if not np.all(np.isfinite(gramian)) and jacobian.dtype != torch.float64:
        gramian = host_gramian(gram(jacobian, dtype=torch.float64))
    return gramian


def host_gramian(gramian: Tensor) -> np.ndarray:
    """A T×T Gramian as the float64 host array the strategies weigh, symmetrised."""
    array = gramian.double().cpu().numpy()
    return (array + array.T) / 2


def clip_weights(weights: np.ndarray, gramian: np.ndarray, max_norm: float | None) -> np.ndarray:
    """Weights scaled so that ``‖Σ_i w_i g_i‖ = √(wᵀ G w)`` is at most ``max_norm`` (None: as is)."""
    if max_norm is None:
        return weights
    norm = float(np.sqrt(max(weights @ gramian @ weights, 0.0)))
    return weights * (max_norm / norm) if norm > max_norm else weights


def check_max_norm(max_norm: float | None) -> None:
    if max_norm is not None and not max_norm > 0:
        raise ValueError(f"max_norm must be positive or None, got {max_norm}")


def gramian_rounding(dtype: torch.dtype, tasks: int, dim: int) -> float:
    """Relative rounding level of a Gramian computed in ``dtype``: ``T √P ε``.

    Each entry of ``J Jᵀ`` sums P products and carries an error of about ``√P ε ‖g_i‖ ‖g_j‖``
    (random-walk accumulation of rounding), so ``‖ΔG‖₂ ≤ T √P ε max_i ‖g_i‖² ≤ T √P ε λ_max``:
    eigenvalues below that are indistinguishable from zero.
    """
    eps = torch.finfo(dtype if dtype.is_floating_point else torch.float64).eps
    return float(tasks * np.sqrt(max(dim, 1)) * eps)


def _as_matrix(jacobian: Tensor) -> Tensor:
    if not isinstance(jacobian, Tensor):
        jacobian = torch.as_tensor(jacobian, dtype=torch.get_default_dtype())
    if jacobian.dim() != 2:
        raise ValueError(
            f"expected a T×P matrix of task gradients, got shape {tuple(jacobian.shape)}"
        )
    if jacobian.shape[0] == 0:
        raise ValueError("expected at least one task gradient (J has no rows)")
    return jacobian.detach()


class LearnedTaskVector:
    """Mixin for strategies that learn one value per task (UW's log-variances, IMTL's loss scales).

    Each task's value is a scalar ``nn.Parameter`` of its own, created once the task count is known
    (at construction with ``num_tasks=``, else at the optimizer's first step), which
    :class:`~mtlopt.MTLOptimizer` adds to the wrapped optimizer as one group without weight decay.
    One parameter per task means that an absent task's value gets no gradient at all (``None``),
    so the wrapped optimizer does not move it, momentum included. Saved in ``state_dict``.
    """

    learned_name: ClassVar[str]
    info: ClassVar[StrategyInfo]
    num_tasks: int | None
    _present: np.ndarray | None

    def _init_learned(self, init: float = 0.0) -> None:
        self._learned_init = float(init)
        self._learned: list[torch.nn.Parameter] = []
        if self.num_tasks is not None:
            self._build()

    def _build(self) -> None:
        if not self._learned:
            assert self.num_tasks is not None
            self._learned = [
                torch.nn.Parameter(torch.tensor(self._learned_init)) for _ in range(self.num_tasks)
            ]

    @property
    def learned(self) -> Tensor:
        """The learned values of every task as one vector (detached)."""
        if not self._learned:
            raise RuntimeError(
                f"{self.info.name}'s {self.learned_name} are created at the first step (or with "
                "num_tasks=)"
            )
        return torch.stack([p.detach() for p in self._learned])

    def learned_like(self, losses: Tensor) -> Tensor:
        """The present tasks' learned values on the losses' device and in their dtype."""
        if not self._learned:
            self.num_tasks = self.num_tasks or losses.shape[0]
            self._build()
        if self._learned[0].device != losses.device:
            for p in self._learned:
                p.data = p.data.to(losses.device)
        tasks = range(len(self._learned)) if self._present is None else self._present
        return torch.stack([self._learned[i] for i in tasks]).to(losses.dtype)

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self._learned)

    def state_dict(self) -> dict[str, Any]:
        values = None if not self._learned else self.learned.clone()
        return {STRATEGY_KEY: self.info.name, self.learned_name: values}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._refuse_other_strategy(state)
        if self.learned_name not in state:
            raise KeyError(f"{self.info.name} state is missing {self.learned_name!r}")
        values = state[self.learned_name]
        if values is None:
            return
        if not isinstance(values, Tensor) or values.dim() != 1:
            raise TypeError(f"{self.learned_name} must be a vector of per-task values")
        if self.num_tasks is not None and values.numel() != self.num_tasks:
            raise ValueError(
                f"{self.info.name} state holds {values.numel()} {self.learned_name}, this strategy "
                f"has {self.num_tasks} tasks"
            )
        if self.num_tasks is None:
            self.num_tasks = values.numel()
        self._build()
        with torch.no_grad():
            for p, value in zip(self._learned, values, strict=True):
                p.copy_(value)


class Randomized:
    """Mixin for strategies that draw random numbers: a private generator whose state is saved.

    ``seed=None`` draws the seed from torch's global generator, so ``torch.manual_seed`` makes runs
    reproducible. Each step draws from a copy of the committed state; the commit advances it.
    """

    _rng_state: dict[str, Any]

    def _init_rng(self, seed: int | None) -> None:
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), generator=None).item())
        self._rng_state = np.random.Generator(np.random.PCG64(seed)).bit_generator.state

    def _step_rng(self) -> tuple[np.random.Generator, Commit]:
        bit_generator = np.random.PCG64()
        # PCG64's state is a dict of ints with one nested dict: copying those two levels suffices.
        bit_generator.state = {**self._rng_state, "state": dict(self._rng_state["state"])}
        rng = np.random.Generator(bit_generator)

        def commit() -> None:
            self._rng_state = bit_generator.state

        return rng, commit


def chain(*commits: Commit) -> Commit:
    def run() -> None:
        for commit in commits:
            commit()

    return run


class TokenStrategy(Strategy):
    """Works on the token activations of a transformer (DTME-MTL): it observes the task losses
    before they are back-propagated, may change the model after a step, and leaves the combination
    of the task gradients to a ``base`` strategy."""

    base: LossStrategy | GradientStrategy
    absent_tasks: ClassVar[str] = (
        "not supported yet: every task needs a loss in every step (an error says so)"
    )

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Called once by :class:`~mtlopt.MTLOptimizer` with itself (new parameters join it)."""

    def observe(self, losses: list[Tensor]) -> None:
        """Called with the raw task losses before the base strategy back-propagates them."""

    def after_step(self) -> None:
        """Called after every optimizer step."""

    def task_parameters(self) -> list[list[torch.nn.Parameter]]:
        """Parameters owned by one task each (``[task][...]``); empty before any are created."""
        return []

    def task_gradients(self, losses: list[Tensor], trainable: list[Tensor], partition: Any) -> Any:
        """The per-task gradients (:class:`mtlopt.engine.TaskGradients`) when the strategy knows a
        cheaper way to them than one backward per task (DTME's task streams); ``None``: take the
        per-task path."""
        return None
