"""Constant: fixed task weights on the rows of J."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..registry import register
from .base import Commit, GramianStrategy, _noop


@register(
    "constant",
    kind="gradient",
    cost="T backward",
    stateful=False,
    paper="torchjd's Constant aggregator (Quinton & Rey, Jacobian Descent for Multi-Objective "
    "Optimization, arXiv 2406.16232, 2024): a fixed linear scalarization",
    conventions="weights=None means 1 per task (the sum of the task gradients, as ew); a "
    "sequence gives one weight per task, in the optimizer's task order",
)
class Constant(GramianStrategy):
    """Constant weights: ``d = Σ_i c_i g_i`` with user-given, fixed ``c``.

    The gradient-space counterpart of a fixed loss weighting; useful as a baseline and to
    reproduce hand-tuned weights with the same Jacobian path (diagnostics, grouping) as the other
    gradient strategies.

    Reference code: torchjd's ``Constant`` aggregator.

    Args:
        weights: one weight per task (default ``None``: every weight 1).
    """

    absent_tasks = "the present tasks' weights; an absent task's weight is unused"

    def __init__(self, weights: Sequence[float] | None = None, num_tasks: int | None = None):
        if weights is not None:
            weights = [float(w) for w in weights]
            if not weights or not all(np.isfinite(weights)):
                raise ValueError(f"weights must be finite numbers, one per task, got {weights}")
            if num_tasks is None:
                num_tasks = len(weights)
            elif num_tasks != len(weights):
                raise ValueError(f"{len(weights)} weights given for {num_tasks} tasks")
        super().__init__(num_tasks)
        self.weights = weights

    def hyperparameters(self) -> dict[str, object]:
        return {"weights": self.weights}

    def weigh(self, gramian: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, Commit]:
        t = gramian.shape[0]
        if self.weights is None:
            return np.ones(t), _noop
        return np.asarray(self.present_entries(self.weights), dtype=np.float64), _noop
