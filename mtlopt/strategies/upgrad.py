"""UPGrad and DualProj: projections onto the dual cone of the task gradients."""

from __future__ import annotations

import numpy as np

from ..registry import register
from ..solvers import project_dual_cone
from .base import Commit, GramianStrategy, _noop


@register(
    "upgrad",
    kind="gradient",
    cost="T backward",
    stateful=False,
    paper="Quinton & Rey, Jacobian Descent for Multi-Objective Optimization, arXiv 2406.16232 "
    "(2024)",
    conventions="mean of the projected task gradients; Gramian normalised by its trace plus a "
    "reg_eps=1e-4 ridge (torchjd's and LibMTL's defaults; reg_eps=0 is the exact projection); no "
    "norm_eps: torchjd's and LibMTL's norm_eps=1e-4 return the plain mean when tr(G) < 1e-4, "
    "which can conflict; mtlopt projects at every scale, as the paper (tested from 1e-15 to "
    "1e15)",
)
class UPGrad(GramianStrategy):
    """UPGrad (Quinton & Rey, 2024, Def. 5): project every task gradient onto the dual cone
    ``{x : J x ≥ 0}`` and average the projections. The projection of ``Jᵀ e_i`` is ``Jᵀ v_i`` with
    ``v_i = argmin_{v ≥ e_i} vᵀ G v`` (Prop. 1), so the weights are ``mean_i v_i``. The update
    conflicts with no task and is linear under scaling of J.

    Args:
        reg_eps: ridge added to the trace-normalised Gramian (default 1e-4, torchjd's value), which
            keeps the projection well posed for linearly dependent gradients.
    """

    def __init__(self, reg_eps: float = 1e-4, num_tasks: int | None = None):
        super().__init__(num_tasks)
        if reg_eps < 0:
            raise ValueError(f"reg_eps must be non-negative, got {reg_eps}")
        self.reg_eps = reg_eps

    def hyperparameters(self) -> dict[str, object]:
        return {"reg_eps": self.reg_eps}

    def weigh(self, gramian: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, Commit]:
        t = gramian.shape[0]
        regularised = _regularise(gramian, self.reg_eps)
        return project_dual_cone(regularised, np.eye(t)).mean(axis=0), _noop


def _regularise(gramian: np.ndarray, reg_eps: float) -> np.ndarray:
    trace = float(np.trace(gramian))
    if not trace > 0:
        return gramian
    return gramian / trace + reg_eps * np.eye(len(gramian))


@register(
    "dualproj",
    kind="gradient",
    cost="T backward",
    stateful=False,
    paper="Quinton & Rey, Jacobian Descent for Multi-Objective Optimization, arXiv 2406.16232 "
    "(2024), DualProj",
    conventions="projects the mean gradient; reg_eps=1e-4 as UPGrad",
)
class DualProj(UPGrad):
    """DualProj (Quinton & Rey, 2024): the mean gradient projected onto the dual cone of the task
    gradients, weights ``argmin_{v ≥ 1/T} vᵀ G v``."""

    def weigh(self, gramian: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, Commit]:
        t = gramian.shape[0]
        return project_dual_cone(_regularise(gramian, self.reg_eps), np.full(t, 1.0 / t)), _noop
