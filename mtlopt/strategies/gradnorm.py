"""GradNorm: gradient normalization for adaptive loss balancing."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from ..registry import register
from ._adam import AdamState, adam_step
from ._state import TaskAxes
from .base import Commit, GramianStrategy


@register(
    "gradnorm",
    kind="gradient",
    cost="T backward",
    stateful=True,
    paper="Chen et al., GradNorm: Gradient Normalization for Adaptive Loss Balancing, ICML 2018",
    conventions="alpha=1.5 (paper's NYUv2 value); gradient norms over all shared parameters "
    "(the paper uses the last shared layer as a cheaper proxy); weights trained by an internal "
    "Adam (lr=0.025) and renormalized to sum to T; L_i(0) = losses of the first step",
)
class GradNorm(GramianStrategy):
    """GradNorm (Chen et al., 2018, Eqs. 1–2 and Algorithm 1).

    Task weights ``w_i`` (initialised to 1) scale the gradients; the update is ``Σ_i w_i g_i``.
    After each step the weights move to reduce ``L_grad = Σ_i |w_i ‖g_i‖ − Ḡ · r_i^α|``, where
    ``Ḡ`` is the mean weighted gradient norm, ``r_i = L̃_i / mean_j L̃_j`` the relative inverse
    training rate and ``L̃_i = L_i(t) / L_i(0)``; the target ``Ḡ · r_i^α`` is held constant (paper,
    Sec. 3.2). The weights are then renormalized so that ``Σ_i w_i = T``.

    Absent tasks: the update, the mean norm and the renormalisation run over the present tasks
    (their weights then sum to their number); an absent task's weight and ``L_i(0)`` stay.

    Args:
        alpha: asymmetry / restoring-force strength (default 1.5).
        lr: learning rate of the internal Adam on the weights (default 0.025).
    """

    absent_tasks = (
        "present rows; weights of the present tasks renormalised to sum to their number; "
        "an absent task's weight, L_i(0) and Adam state stay"
    )

    _state_attrs = ("weights", "initial_losses", "_adam")
    _task_state: ClassVar[dict[str, TaskAxes]] = {
        "weights": TaskAxes((0,), 1.0),
        "initial_losses": TaskAxes((0,), np.nan),
        "_adam": TaskAxes((0,), 0.0),
    }

    def __init__(self, alpha: float = 1.5, lr: float = 0.025, num_tasks: int | None = None):
        super().__init__(num_tasks)
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        self.alpha = alpha
        self.lr = lr
        self.weights: np.ndarray | None = None
        self.initial_losses: np.ndarray | None = None
        self._adam: AdamState | None = None

    def hyperparameters(self) -> dict[str, object]:
        return {"alpha": self.alpha, "lr": self.lr}

    def weigh(self, gramian: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, Commit]:
        if losses is None:
            raise ValueError("GradNorm needs the task losses: pass losses= to aggregate()")
        t = gramian.shape[0]
        weights = np.ones(t) if self.weights is None else self.weights
        if weights.shape[0] != t:
            raise ValueError(f"GradNorm holds {weights.shape[0]} task weights but got {t} tasks")
        initial = losses.copy() if self.initial_losses is None else self.initial_losses
        initial = np.where(np.isnan(initial), losses, initial)  # a task's first step
        norms = np.sqrt(np.clip(np.diag(gramian), 0.0, None))
        grad = gradnorm_weight_gradient(weights, norms, losses, initial, self.alpha)
        adam = AdamState.zeros(t) if self._adam is None else self._adam
        new_weights, adam = adam_step(weights, grad, adam, self.lr)
        new_weights = np.clip(new_weights, 1e-8, None)
        new_weights *= t / new_weights.sum()

        def commit() -> None:
            self.weights, self.initial_losses, self._adam = new_weights, initial, adam

        return weights.copy(), commit


def gradnorm_weight_gradient(
    weights: np.ndarray,
    norms: np.ndarray,
    losses: np.ndarray,
    initial_losses: np.ndarray,
    alpha: float,
) -> np.ndarray:
    """``∂L_grad/∂w`` of GradNorm's Eq. 2 with the target ``Ḡ · r_i^α`` held constant."""
    t = weights.shape[0]
    weighted_norms = weights * norms
    ratios = np.divide(losses, initial_losses, out=np.ones(t), where=initial_losses > 0)
    inverse_rate = ratios / ratios.mean() if ratios.mean() > 0 else np.ones(t)
    target = weighted_norms.mean() * inverse_rate**alpha
    return np.sign(weighted_norms - target) * norms
