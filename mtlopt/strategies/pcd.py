"""PCD: priority-constrained descent."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from ..registry import register
from ._state import TaskAxes
from .base import Commit, GramianStrategy


@register(
    "pcd",
    kind="gradient",
    cost="T backward",
    stateful=True,
    paper="Varam et al., Not All Objectives Are Born Equal: Priority-Constrained Descent for "
    "Hierarchical Multi-Objective Optimization, TMLR 2026 (arXiv 2606.29521)",
    conventions="tau=0.02, beta=0.999, eps=1e-8 (torchjd's defaults); primary task by name or "
    "index (default: the first task); the QP is solved exactly in Gramian space by a "
    "non-negative active-set method on its dual (torchjd: Goldfarb–Idnani; the authors' "
    "reference enumerates working sets); infeasible constraints → g_primary; each task's EMA has "
    "its own bias correction",
)
class PCD(GramianStrategy):
    """Priority-Constrained Descent (TMLR 2026).

    With ``g̃_i = g_i / √(v̂_i + ε)`` (``v̂_i``: bias-corrected EMA, rate β, of ``‖g_i‖²``) and the
    primary task p, solve

    ``d̃ = argmin_d ½‖d − g̃_p‖²  s.t.  g̃_jᵀ d ≥ τ ‖g̃_j‖²  for every secondary task j``

    and return ``d̃ ‖g_p‖ / ‖d̃‖``: follow the primary task as closely as possible while each
    secondary task keeps a fraction τ of the progress its own normalised gradient would give. The
    dual is a non-negative QP in the multipliers μ (``d̃ = g̃_p + Σ_j μ_j g̃_j``), so the whole
    solve runs on the T×T Gramian. Special cases: ``g_p = 0`` gives 0; infeasible constraints (two
    opposite secondary tasks) are dropped and the update is ``g_p``.

    Reference code: DaraVaram/priority-constrained-descent (working-set enumeration); torchjd
    0.18's ``PCD``.

    Args:
        primary: the primary task, by name (``"seg"``: resolved against the optimizer's task
            names) or index (default 0: the first task).
        tau: guaranteed progress fraction τ in [0, 1], one value or one per secondary task
            (default 0.02).
        beta: EMA rate of the squared norms, in [0, 1) (default 0.999).
        eps: ε under the square root (default 1e-8).
    """

    absent_tasks = (
        "the present secondary tasks constrain the step; an absent task's EMA is not advanced; "
        "with the primary task absent the shared update is zero (as for g_primary = 0)"
    )

    float64_gramian = True  # its normalisation by wᵀ G w cancels near conflicting constraints
    _state_attrs = ("_squared_ema", "_steps")
    _task_state: ClassVar[dict[str, TaskAxes]] = {
        "_squared_ema": TaskAxes((0,), 0.0),
        "_steps": TaskAxes((0,), 0.0),
    }

    def __init__(
        self,
        primary: str | int = 0,
        tau: float | Sequence[float] = 0.02,
        beta: float = 0.999,
        eps: float = 1e-8,
        num_tasks: int | None = None,
    ):
        super().__init__(num_tasks)
        taus = np.atleast_1d(np.asarray(tau, dtype=np.float64))
        if taus.ndim != 1 or not np.all((taus >= 0) & (taus <= 1)):
            raise ValueError(f"tau must lie in [0, 1], got {tau}")
        if not (0 <= beta < 1 and eps >= 0):
            raise ValueError(f"need 0 ≤ beta < 1 and eps ≥ 0, got beta={beta}, eps={eps}")
        if not isinstance(primary, (str, int)) or isinstance(primary, bool):
            raise TypeError(f"primary is a task name or index, got {primary!r}")
        self.primary, self.tau, self.beta, self.eps = primary, tau, beta, eps
        self._squared_ema: np.ndarray | None = None
        self._steps: np.ndarray | None = None

    def hyperparameters(self) -> dict[str, object]:
        return {"primary": self.primary, "tau": self.tau, "beta": self.beta, "eps": self.eps}

    def _taus(self, secondary: np.ndarray) -> np.ndarray:
        """τ of each present secondary task (``secondary``: their indices in the full order)."""
        taus = np.atleast_1d(np.asarray(self.tau, dtype=np.float64))
        if taus.size == 1:
            return np.full(len(secondary), float(taus[0]))
        total = self.num_tasks
        if total is not None and taus.size != total - 1:
            raise ValueError(f"tau has {taus.size} values for {total - 1} secondary tasks")
        primary = self.task_index(self.primary)
        return taus[[j if j < primary else j - 1 for j in secondary]]

    def weigh(self, gramian: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, Commit]:
        return self.weigh_at_precision(gramian, losses, 0.0)

    def weigh_at_precision(
        self, gramian: np.ndarray, losses: np.ndarray | None, rounding: float
    ) -> tuple[np.ndarray, Commit]:
        t = gramian.shape[0]
        squared = np.clip(np.diag(gramian), 0.0, None)
        ema = np.zeros(t) if self._squared_ema is None else self._squared_ema
        steps = np.zeros(t) if self._steps is None else self._steps
        new_ema, new_steps = self.beta * ema + (1 - self.beta) * squared, steps + 1

        def commit() -> None:
            self._squared_ema, self._steps = new_ema, new_steps

        weights = np.zeros(t)
        row = self.present_position(self.task_index(self.primary))
        if row is None or squared[row] <= 0:
            return weights, commit
        debiased = new_ema / (1 - self.beta**new_steps)
        roots = np.sqrt(debiased + self.eps)
        scales = np.where(roots > 0, 1 / np.where(roots > 0, roots, 1.0), 0.0)
        order = np.r_[row, np.delete(np.arange(t), row)]
        full = np.arange(t) if self._present is None else self._present
        taus = self._taus(full[order[1:]])
        normalised = gramian[np.ix_(order, order)] * np.outer(scales[order], scales[order])
        w = priority_weights(normalised, taus, rounding)
        length = float(w @ normalised @ w)
        rounding = 10 * np.finfo(np.float64).eps * float(np.abs(w) @ np.sqrt(np.diag(normalised))) ** 2
        if length > rounding:
            weights[order] = w * scales[order] * np.sqrt(squared[row] / length)
        return weights, commit


def priority_weights(gramian: np.ndarray, taus: np.ndarray, rounding: float = 0.0) -> np.ndarray:
    """PCD's QP on a Gramian whose first row is the primary task: ``[1, μ]`` with ``μ ≥ 0`` the
    multipliers of ``min ½‖d − g_1‖²  s.t.  g_jᵀ d ≥ τ_j ‖g_j‖²``, ``d = g_1 + Σ_j μ_j g_j``;
    ``[1, 0, …]`` when the constraints are infeasible.

    The dual, ``min_{μ ≥ 0} ½ μᵀ G_s μ − bᵀ μ`` with ``b_j = τ_j G_jj − G_j1``, is solved by a
    primal-dual active-set method (:func:`_nonnegative_qp_support`), or where that cycles by the
    Lawson–Hanson active-set method (:func:`_lawson_hanson`), with a
    ridge on ``G_s`` of ``max(1e-9, rounding)`` of the scale (``rounding``: the Gramian's relative
    rounding level, :func:`~mtlopt.strategies.base.gramian_rounding`, which a float32 Gramian can
    make indefinite by); then the primal constraints are checked: an unbounded dual (infeasible
    primal) fails that check.
    """
    m = gramian.shape[0]
    weights = np.zeros(m)
    weights[0] = 1.0
    if m == 1:
        return weights
    b = taus * np.diag(gramian)[1:] - gramian[1:, 0]
    scale = max(float(np.max(np.diag(gramian))), np.finfo(np.float64).tiny)
    # The ridge makes the dual strictly convex (dependent secondary gradients have non-unique
    # multipliers) and positive definite despite rounding, so the active set method terminates.
    ridge = max(1e-9, rounding)
    hessian = gramian[1:, 1:] + ridge * scale * np.eye(m - 1)
    tol = 1e-10 * scale
    mu = _nonnegative_qp_support(hessian, b, tol)
    if mu is None:
        mu = _lawson_hanson(hessian, b, tol)
    slack = gramian[1:, 1:] @ mu - b  # g_jᵀ d − τ_j ‖g_j‖² for d = g_1 + Σ μ_j g_j
    if np.any(slack < -max(1e-6, 100 * ridge) * scale) or not np.all(np.isfinite(mu)):
        return weights
    weights[1:] = mu
    return weights


def _nonnegative_qp_support(
    hessian: np.ndarray, b: np.ndarray, tol: float, max_iter: int = 50
) -> np.ndarray | None:
    """``argmin_{μ ≥ 0} ½ μᵀ H μ − bᵀ μ`` by a primal-dual active-set method (Hintermüller, Ito &
    Kunisch, 2002): on the free set F solve ``H_FF μ_F = b_F`` (one Cholesky factorisation), then
    the ``μ_j ≤ 0`` leave F and the bounds whose gradient ``(b − H μ)_j`` exceeds ``tol`` join it,
    from ``F = {b_j > tol}``. It stops where Lawson–Hanson does (no gradient above ``tol`` off F,
    ``μ_F > 0``), with a few factorisations instead of one per constraint added. None if a free
    set repeats (the method can cycle), ``H_FF`` fails Cholesky or ``max_iter`` steps pass."""
    from scipy.linalg import cho_factor, cho_solve

    n = len(b)
    free = b > tol
    seen: set[bytes] = set()
    for _ in range(max_iter):
        key = np.packbits(free).tobytes()
        if key in seen:
            return None
        seen.add(key)
        mu = np.zeros(n)
        index = np.flatnonzero(free)
        if index.size:
            try:
                factor = cho_factor(hessian[np.ix_(index, index)], check_finite=False)
            except np.linalg.LinAlgError:
                return None
            mu[index] = cho_solve(factor, b[index], check_finite=False)
        gradient = b - hessian @ mu
        leave = free & (mu <= 0)
        join = ~free & (gradient > tol)
        if not leave.any() and not join.any():
            return mu
        free = (free & ~leave) | join
    return None


def _lawson_hanson(hessian: np.ndarray, b: np.ndarray, tol: float) -> np.ndarray:
    """``argmin_{μ ≥ 0} ½ μᵀ H μ − bᵀ μ`` by Lawson–Hanson: one constraint joins the passive set
    per outer step (the largest gradient above ``tol``), inner steps keep μ feasible."""
    m = len(b) + 1
    mu = np.zeros(m - 1)
    passive = np.zeros(m - 1, dtype=bool)
    for _ in range(5 * m + 10):
        gradient = b - hessian @ mu
        candidates = ~passive & (gradient > tol)
        if not candidates.any():
            break
        passive[int(np.argmax(np.where(candidates, gradient, -np.inf)))] = True
        for _ in range(5 * m + 10):
            index = np.nonzero(passive)[0]
            z = np.zeros(m - 1)
            z[index] = np.linalg.solve(hessian[np.ix_(index, index)], b[index])
            if np.all(z[index] > 0):
                mu = z
                break
            negative = index[z[index] <= 0]
            alpha = np.min(mu[negative] / (mu[negative] - z[negative]))
            mu = mu + alpha * (z - mu)
            passive &= mu > 1e-15 * max(1.0, float(mu.max(initial=0.0)))
            mu[~passive] = 0.0
    return mu
