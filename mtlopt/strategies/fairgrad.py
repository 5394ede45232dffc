"""FairGrad: α-fair multi-task optimization."""

from __future__ import annotations

import numpy as np

from ..registry import register
from ..solvers import fair_weights
from .base import Commit, GramianStrategy, _noop, check_max_norm, clip_weights


@register(
    "fairgrad",
    kind="gradient",
    cost="T backward",
    stateful=False,
    paper="Ban & Ji, Fair Resource Allocation in Multi-Task Learning, ICML 2024",
    conventions="alpha=1 (proportional fairness); the fairness equation is solved exactly by "
    "Newton's method on its convex potential (the authors use scipy least_squares); update "
    "Σ w_i g_i as the paper: the authors' code multiplies it by T and clips it to norm 1 "
    "(times_tasks=True, max_norm=1.0)",
)
class FairGrad(GramianStrategy):
    """FairGrad (Ban & Ji, 2024, Eq. 6): weights ``w > 0`` with ``G w = w^{-1/α}``, update
    ``Σ_i w_i g_i``. α = 1 is proportional fairness (the Nash condition on the raw Gramian),
    α → ∞ approaches max-min fairness.

    Args:
        alpha: fairness parameter α > 0 (default 1).
        times_tasks: multiply the update by T, as the authors' code (default False: the paper).
        max_norm: then clip the update to this norm (default None; the authors' code clips to 1).
    """

    def __init__(
        self,
        alpha: float = 1.0,
        times_tasks: bool = False,
        max_norm: float | None = None,
        num_tasks: int | None = None,
    ):
        super().__init__(num_tasks)
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        check_max_norm(max_norm)
        self.alpha, self.times_tasks, self.max_norm = alpha, times_tasks, max_norm

    def hyperparameters(self) -> dict[str, object]:
        return {"alpha": self.alpha, "times_tasks": self.times_tasks, "max_norm": self.max_norm}

    def weigh(self, gramian: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, Commit]:
        weights = fair_weights(gramian, self.alpha)
        if self.times_tasks:
            weights = weights * len(gramian)
        return clip_weights(weights, gramian, self.max_norm), _noop
