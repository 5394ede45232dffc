"""FairGrad: α-fair multi-task optimization."""

from __future__ import annotations

import numpy as np

from ..registry import register
from ..solvers import fair_weights
from .base import Commit, GramianStrategy, _noop


@register(
    "fairgrad",
    kind="gradient",
    cost="T backward",
    stateful=False,
    paper="Ban & Ji, Fair Resource Allocation in Multi-Task Learning, ICML 2024",
    conventions="alpha=1 (proportional fairness); the fairness equation is solved exactly by "
    "Newton's method on its convex potential (the authors use scipy least_squares)",
)
class FairGrad(GramianStrategy):
    """FairGrad (Ban & Ji, 2024, Eq. 6): weights ``w > 0`` with ``G w = w^{-1/α}``, update
    ``Σ_i w_i g_i``. α = 1 is proportional fairness (the Nash condition on the raw Gramian),
    α → ∞ approaches max-min fairness.

    Args:
        alpha: fairness parameter α > 0 (default 1).
    """

    def __init__(self, alpha: float = 1.0, num_tasks: int | None = None):
        super().__init__(num_tasks)
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        self.alpha = alpha

    def hyperparameters(self) -> dict[str, object]:
        return {"alpha": self.alpha}

    def weigh(self, gramian: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, Commit]:
        return fair_weights(gramian, self.alpha), _noop
