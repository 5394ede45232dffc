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

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ..registry import StrategyInfo

Commit = Callable[[], None]


def _noop() -> None:
    return None


@dataclass
class Combined:
    """Result of combining per-task gradients."""

    direction: Tensor
    """The combined P-vector written to the shared parameters' gradients."""
    weights: Tensor | None
    """Effective task weights (``direction = weights @ J``) where the method is linear in ``J``."""
    commit: Commit = _noop
    gramian: np.ndarray | None = None
    """``J Jᵀ`` (float64, host) when the strategy computed it, reused for the diagnostics."""


@dataclass
class Scalarized:
    """Result of scalarizing the task losses."""

    loss: Tensor
    """The scalar objective to back-propagate."""
    weights: Tensor
    """Effective task weights ``∂loss/∂L_i`` (detached), for diagnostics."""
    commit: Commit = _noop


class Strategy:
    """Common base: metadata, optional task count, state (de)serialization."""

    info: ClassVar[StrategyInfo]

    def __init__(self, num_tasks: int | None = None) -> None:
        if num_tasks is not None and num_tasks < 1:
            raise ValueError(f"num_tasks must be at least 1, got {num_tasks}")
        self.num_tasks = num_tasks

    # State -------------------------------------------------------------------------------------
    _state_attrs: ClassVar[tuple[str, ...]] = ()
    """Names of the attributes that make up the strategy's state (saved by ``state_dict``)."""

    def state_dict(self) -> dict[str, Any]:
        return {name: copy.deepcopy(getattr(self, name)) for name in self._state_attrs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self._state_attrs) - set(state)
        if missing:
            raise KeyError(f"{type(self).__name__} state is missing {sorted(missing)}")
        for name in self._state_attrs:
            setattr(self, name, copy.deepcopy(state[name]))

    def parameters(self) -> list[torch.nn.Parameter]:
        """Learnable parameters the wrapped optimizer should train (e.g. UW's log-variances)."""
        return []

    def check_num_tasks(self, num_tasks: int) -> None:
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

    supports_representation: ClassVar[bool] = True
    """Whether the strategy may combine gradients taken with respect to shared features."""

    def transform_loss(self, index: int, loss: Tensor) -> Tensor:
        """A differentiable map applied to task ``index``'s loss before differentiation.

        Identity by default; IMTL's loss scaling ``e^s L − s`` overrides it. It acts on one task at
        a time so that each task's backward pass only walks that task's graph.
        """
        return loss

    def combine(self, jacobian: Tensor, losses: Tensor | None = None) -> Combined:
        """Combine without changing the strategy's state; ``commit`` advances it."""
        raise NotImplementedError

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

    def combine(self, jacobian: Tensor, losses: Tensor | None = None) -> Combined:
        gramian = gramian_of(jacobian)
        loss_array = None if losses is None else losses.detach().double().cpu().numpy()
        rounding = gramian_rounding(jacobian.dtype, *jacobian.shape)
        weights, commit = self.weigh_at_precision(gramian, loss_array, rounding)
        if not np.all(np.isfinite(weights)):
            raise FloatingPointError(f"{self.info.name} produced non-finite task weights {weights}")
        w = torch.from_numpy(np.ascontiguousarray(weights)).to(jacobian.device, jacobian.dtype)
        return Combined(direction=w @ jacobian, weights=w, commit=commit, gramian=gramian)


def gramian_of(jacobian: Tensor) -> np.ndarray:
    """``J Jᵀ`` as a float64 host array (one matrix product on the device, one transfer).

    A finite float32 ``J`` with entries beyond ~1e19 overflows its Gramian: it is then recomputed
    in float64 (only in that case, to keep the common path at one pass in ``J``'s dtype). A ``J``
    that requires grad is read as data (detached)."""
    jacobian = jacobian.detach()
    gramian = (jacobian @ jacobian.T).double().cpu().numpy()
    if not np.all(np.isfinite(gramian)) and jacobian.dtype != torch.float64:
        wide = jacobian.double()
        gramian = (wide @ wide.T).cpu().numpy()
    return (gramian + gramian.T) / 2


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

    The vector is an ``nn.Parameter`` that :class:`~mtlopt.MTLOptimizer` adds to the wrapped
    optimizer (without weight decay); it is saved in ``state_dict`` and follows the losses' device.
    """

    learned_name: ClassVar[str]
    info: ClassVar[StrategyInfo]

    def _init_learned(self, num_tasks: int | None, init: float = 0.0) -> None:
        if num_tasks is None:
            raise ValueError(f"{self.info.name} needs num_tasks= to create its {self.learned_name}")
        setattr(self, self.learned_name, torch.nn.Parameter(torch.full((num_tasks,), float(init))))

    @property
    def learned(self) -> torch.nn.Parameter:
        return getattr(self, self.learned_name)

    def learned_like(self, losses: Tensor) -> Tensor:
        """The learned vector on the losses' device and in their dtype (moved once if needed)."""
        if self.learned.device != losses.device:
            self.learned.data = self.learned.data.to(losses.device)
        return self.learned.to(losses.dtype)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [self.learned]

    def state_dict(self) -> dict[str, Any]:
        return {self.learned_name: self.learned.detach().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.learned.copy_(state[self.learned_name])


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

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Called once by :class:`~mtlopt.MTLOptimizer` with itself (new parameters join it)."""

    def observe(self, losses: list[Tensor]) -> None:
        """Called with the raw task losses before the base strategy back-propagates them."""

    def after_step(self) -> None:
        """Called after every optimizer step."""

    def task_parameters(self) -> list[list[torch.nn.Parameter]]:
        """Parameters owned by one task each (``[task][...]``); empty before any are created."""
        return []
