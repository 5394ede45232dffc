"""Nash-MTL: multi-task learning as a bargaining game."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from ..registry import register
from ..solvers import fair_weights
from ._state import TaskAxes
from .base import Commit, GramianStrategy


@register(
    "nash_mtl",
    kind="gradient",
    cost="T backward",
    stateful=True,
    paper="Navon et al., Multi-Task Learning as a Bargaining Game, ICML 2022",
    conventions="max_norm=1.0 (the authors' code clips the shared gradient to norm 1; None "
    "disables); update_weights_every=1; bargaining condition solved exactly by Newton's method on "
    "its convex potential instead of the paper's sequence of convex approximations (same fixed "
    "point, no cvxpy)",
)
class NashMTL(GramianStrategy):
    """Nash-MTL (Navon et al., 2022, Eq. 2 and Sec. 3.2).

    The Nash bargaining solution: ``α > 0`` with ``(G α)_i = 1/α_i`` on the Frobenius-normalised
    Gramian ``G / ‖G‖_F``, update ``Σ_i α_i g_i`` on the raw gradients (as the authors' code).
    The paper reaches that point through a sequence
    of convex approximations solved by cvxpy; the same condition is the stationarity condition of
    the strictly convex ``½ αᵀGα − Σ log α_i``, which :func:`mtlopt.solvers.fair_weights` solves
    by damped Newton steps to machine precision, so no convex-programming dependency is needed.
    For two tasks the result is ``(u_1 + u_2) / √(1 + cos)`` in the normalised geometry.

    Args:
        max_norm: clip the combined gradient to this norm (default 1.0, the authors' code).
        update_weights_every: recompute ``α`` every k steps and reuse it in between (default 1).
    """

    absent_tasks = (
        "bargaining among the present tasks; an absent task's α is not reused"
    )

    _state_attrs = ("_alpha", "_step")
    _task_state: ClassVar[dict[str, TaskAxes]] = {"_alpha": TaskAxes((0,), np.nan)}

    def __init__(
        self,
        max_norm: float | None = 1.0,
        update_weights_every: int = 1,
        num_tasks: int | None = None,
    ):
        super().__init__(num_tasks)
        if update_weights_every < 1:
            raise ValueError("update_weights_every must be at least 1")
        if max_norm is not None and max_norm <= 0:
            raise ValueError("max_norm must be positive or None")
        self.max_norm = max_norm
        self.update_weights_every = update_weights_every
        self._alpha: np.ndarray | None = None
        self._step = 0

    def hyperparameters(self) -> dict[str, object]:
        return {"max_norm": self.max_norm, "update_weights_every": self.update_weights_every}

    def weigh(self, gramian: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, Commit]:
        reuse = self._alpha is not None and self._step % self.update_weights_every != 0
        if reuse and not np.isnan(self._alpha).any():
            alpha = self._alpha
        else:
            frobenius = float(np.linalg.norm(gramian))
            alpha = fair_weights(gramian / frobenius) if frobenius > 0 else np.zeros(len(gramian))
        weights = alpha
        if self.max_norm is not None:
            norm = float(np.sqrt(max(alpha @ gramian @ alpha, 0.0)))
            if norm > self.max_norm:
                weights = alpha * (self.max_norm / norm)
        step = self._step + 1

        def commit() -> None:
            self._alpha, self._step = alpha, step

        return weights, commit
