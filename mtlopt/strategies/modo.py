"""MoDo: multi-objective gradient with double sampling."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from ..hooks import MultiBatch
from ..registry import register
from ._state import TaskAxes
from .base import Combined, GradientStrategy, gramian_of


@register(
    "modo",
    kind="gradient",
    cost="2-3 batches × T backward",
    stateful=True,
    paper="Chen et al., Three-Way Trade-Off in Multi-Objective Learning: Optimization, "
    "Generalization and Conflict-Avoidance, NeurIPS 2023",
    conventions="three draws per step (paper's z₁, z₂, z₃; LibMTL); batches=2 is torchjd's and "
    "the official code's two-batch form (λ from J₁J₂ᵀ, update along (J₁ + J₂)/2; the official "
    "code sums, a factor 2 in the learning rate); gamma=1e-3, rho=0.1 (LibMTL; torchjd and the "
    "official code 0.1, 0.1); Euclidean simplex projection (paper, official code, LibMTL, "
    "torchjd); heads get the last draw's gradient (LibMTL averages the three draws' head "
    "gradients, torchjd's two-batch example weighs the mean of both by λ)",
    hooks=("batches",),
)
class MoDo(MultiBatch, GradientStrategy):
    """MoDo (Chen et al., NeurIPS 2023, Algorithm 1).

    With per-task Jacobians ``J₁, J₂, J₃`` of three independent batches::

        λ ← Π_Δ( λ − γ (J₁ J₂ᵀ λ + ρ λ) ),      d = J₃ᵀ λ

    ``J₁ J₂ᵀ`` is an unbiased estimate of the Gramian (double sampling), which is what gives MoDo
    its convergence guarantee; ``λ`` starts uniform and is kept between steps. With
    :class:`~mtlopt.MTLOptimizer`, ``step(closure)`` calls the closure ``batches`` times (it must
    draw a new batch at each call) or takes ``step([losses_1, losses_2, losses_3])``; the last draw
    is back-propagated as usual (its gradients reach the heads).

    With ``batches=2`` (the two-batch form of torchjd's ``MoDoWeighting`` example and of the
    official code, Trade-Off-MOL's ``MoDo.backward``) the same ``λ`` update uses the two draws, and
    the update is ``d = ((J₁ + J₂)/2)ᵀ λ``; the official code steps along the sum ``(J₁ + J₂)ᵀ λ``,
    i.e. twice the learning rate. The heads still get the last draw's own gradient (torchjd's
    example gives head ``t`` the weight ``λ_t`` on the mean of both draws' head gradients; LibMTL's
    three-batch form divides the sum of the three draws' head gradients by 3).

    Cross-checked (``tests/test_multibatch_peers.py``): on the same draws, ``λ`` and the shared
    parameters' update equal torchjd 0.18's ``MoDoWeighting`` fed ``J₁ J₂ᵀ`` to 1e-10 in float64,
    for both forms, over three steps.

    Args:
        gamma: step size of the weights ``γ`` (default 1e-3, LibMTL; torchjd and the official
            code use 0.1).
        rho: ℓ₂ regularisation ``ρ`` of the weights (default 0.1).
        batches: 3 (default: the paper's three draws) or 2 (torchjd's and the official code's
            form: ``λ`` from ``J₁ J₂ᵀ``, the update along the mean of the two draws).
    """

    absent_tasks = (
        "every draw needs the tasks of the last one (an error says so); λ is restricted to the "
        "present tasks (re-projected by the update), an absent task's λ is kept"
    )

    _state_attrs = ("weights",)
    _task_state: ClassVar[dict[str, TaskAxes]] = {"weights": TaskAxes((0,), np.nan)}

    def __init__(
        self, gamma: float = 1e-3, rho: float = 0.1, batches: int = 3,
        num_tasks: int | None = None,
    ):  # fmt: skip
        super().__init__(num_tasks)
        if not gamma > 0:
            raise ValueError(f"gamma must be positive, got {gamma}")
        if not rho >= 0:
            raise ValueError(f"rho must be non-negative, got {rho}")
        if batches not in (2, 3):
            raise ValueError(f"batches must be 2 or 3, got {batches}")
        self.gamma, self.rho, self.batches = gamma, rho, batches
        self.weights: np.ndarray | None = None

    def hyperparameters(self) -> dict[str, object]:
        return {"gamma": self.gamma, "rho": self.rho, "batches": self.batches}

    def combine(self, jacobian: Tensor, losses: Tensor | None = None) -> Combined:
        first, second = (*self.other_jacobians(), jacobian)[:2]
        cross = cross_gramian(first, second)
        lam = current_weights(self.weights, jacobian.shape[0])
        new = project_to_simplex(lam - self.gamma * (cross @ lam + self.rho * lam))
        w = torch.from_numpy(new).to(jacobian.device, jacobian.dtype)
        along = jacobian if self.batches == 3 else (first + second) / 2

        def commit() -> None:
            self.weights = new

        return Combined(w @ along, w, commit, gramian=gramian_of(jacobian))


def cross_gramian(first: Tensor, second: Tensor) -> np.ndarray:
    """``J₁ J₂ᵀ`` of two draws as a float64 host array."""
    return (first.detach().double() @ second.detach().double().T).cpu().numpy()


def current_weights(weights: np.ndarray | None, tasks: int) -> np.ndarray:
    """The kept weights (uniform where never set)."""
    if weights is None:
        return np.full(tasks, 1.0 / tasks)
    return np.where(np.isnan(weights), 1.0 / tasks, weights)


def project_to_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto ``{w ≥ 0, Σ w = 1}`` (sort-based, Held et al. 1974)."""
    u = np.sort(v)[::-1]
    cumulative = np.cumsum(u) - 1.0
    index = np.arange(1, v.size + 1)
    last = np.nonzero(u - cumulative / index > 0)[0][-1]
    return np.maximum(v - cumulative[last] / (last + 1), 0.0)
