"""CAGrad: conflict-averse gradient descent."""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy.optimize import minimize

from ..registry import register
from ..solvers import project_dual_cone, simplex_qp_support, support_solve
from .base import Commit, GramianStrategy, _noop, check_max_norm, clip_weights


@register(
    "cagrad",
    kind="gradient",
    cost="T backward",
    stateful=False,
    paper="Liu et al., Conflict-Averse Gradient Descent for Multi-task Learning, NeurIPS 2021",
    conventions="c=0.4 (paper's NYUv2 value; 0.5 in the toy); rescale=1 divides by 1+c² as the "
    "official code; rescale=0 is the paper's Algorithm 1 (and torchjd); the authors' training "
    "code multiplies the update by T (times_tasks=True), the FAMO repository's CAGrad also clips "
    "it to norm 1 (max_norm=1.0); at Pareto-stationary inputs with c ≥ 1 the maximiser nearest "
    "g_0 (the dual's formula is undefined there)",
)
class CAGrad(GramianStrategy):
    """CAGrad (Liu et al., 2021, Eq. 5 and Algorithm 1).

    With ``g_0`` the average gradient and ``φ = c² ‖g_0‖²``, solve the dual
    ``min_{w ∈ Δ} g_wᵀ g_0 + √φ ‖g_w‖`` (``g_w = Σ_i w_i g_i``) and update along
    ``d = g_0 + (√φ / ‖g_w‖) g_w``. ``c = 0`` gives plain averaging.

    For ``c ≥ 1`` the ball contains ``d = 0``, so the primal ``max_d min_i g_i·d`` (Eq. 4) is never
    negative and its maximisers conflict with no task. At a Pareto-stationary point (0 in the
    convex hull of the gradients) the dual's minimiser is ``g_w = 0``, where the formula for ``d``
    is undefined and a numerical ``g_w`` near zero points anywhere: there the maximisers are the
    points of the ball with ``J d ≥ 0``, and the one returned is the nearest to ``g_0``, the
    projection of ``g_0`` onto the dual cone ``{d : J d ≥ 0}`` (solved only when the dual's ``d``
    conflicts with a task).

    Args:
        c: radius of the ball around ``g_0`` (default 0.4, the paper's NYUv2 setting).
        rescale: 0: no rescaling (paper); 1: divide by ``1 + c²`` (official code's default);
            2: divide by ``1 + c``.
        times_tasks: multiply the update by T, as the authors' training code (default False).
        max_norm: then clip the update to this norm (default None; the FAMO repository's CAGrad
            clips to 1).
    """

    def __init__(
        self,
        c: float = 0.4,
        rescale: Literal[0, 1, 2] = 1,
        times_tasks: bool = False,
        max_norm: float | None = None,
        num_tasks: int | None = None,
    ):
        super().__init__(num_tasks)
        check_max_norm(max_norm)
        self.times_tasks, self.max_norm = times_tasks, max_norm
        if c < 0:
            raise ValueError(f"c must be non-negative, got {c}")
        if rescale not in (0, 1, 2):
            raise ValueError(f"rescale must be 0, 1 or 2, got {rescale!r}")
        self.c = c
        self.rescale = rescale

    def hyperparameters(self) -> dict[str, object]:
        return {
            "c": self.c,
            "rescale": self.rescale,
            "times_tasks": self.times_tasks,
            "max_norm": self.max_norm,
        }

    def weigh(self, gramian: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, Commit]:
        t = gramian.shape[0]
        mean_weights = np.full(t, 1.0 / t)
        g0_norm = float(np.sqrt(max(mean_weights @ gramian @ mean_weights, 0.0)))
        weights = mean_weights.copy()
        if self.c > 0 and g0_norm > 0:
            w = _solve_dual(gramian / g0_norm**2, self.c)
            gw_norm2 = float(w @ gramian @ w)
            if gw_norm2 > 0:
                weights += (self.c * g0_norm / np.sqrt(gw_norm2)) * w
            if self.c >= 1 and _conflicts(gramian, weights):
                weights = project_dual_cone(gramian, mean_weights)
        divisor = {0: 1.0, 1: 1.0 + self.c**2, 2: 1.0 + self.c}[self.rescale]
        weights = weights / divisor * (t if self.times_tasks else 1)
        return clip_weights(weights, gramian, self.max_norm), _noop


def _conflicts(gramian: np.ndarray, weights: np.ndarray) -> bool:
    """Whether ``d = Σ_i w_i g_i`` has ``g_i·d < 0`` for some task, beyond rounding."""
    products = gramian @ weights
    norms = np.sqrt(np.clip(np.diag(gramian), 0.0, None))
    length = np.sqrt(max(float(weights @ products), 0.0))
    return bool(np.any(products < -1e-9 * norms * length))


def _solve_dual(gramian: np.ndarray, c: float) -> np.ndarray:
    """``argmin_{w ∈ Δ} wᵀ G b + c √(wᵀ G w)`` with ``b`` uniform (G scaled so that ‖g_0‖ = 1):
    exactly on the solution's support (:func:`_solve_dual_on_support`), else by SLSQP."""
    w = _solve_dual_on_support(gramian, c)
    return w if w is not None else _solve_dual_slsqp(gramian, c)


def _solve_dual_on_support(gramian: np.ndarray, c: float, max_iter: int = 50) -> np.ndarray | None:
    """The dual's minimiser from its support, or None where the method does not apply.

    With ``a = G b`` and ``s`` standing for ``‖g_w‖``, ``√x = min_{s>0} x/(2s) + s/2`` turns the
    dual into the jointly convex ``min_{w ∈ Δ, s > 0} aᵀw + c wᵀGw/(2s) + c s/2``. Alternating
    its exact minimisations, ``w`` is the simplex QP ``argmin ½ wᵀGw + (s/c) aᵀw``
    (:func:`~mtlopt.solvers.simplex_qp_support`, warm-started from the last support) and
    ``s = ‖g_w‖``; after each QP the dual is solved in closed form on the QP's support S
    (:func:`_closed_form_on_support`), and that point is returned once it satisfies the dual's
    KKT conditions. Four to eight rounds on random Gaussian Gramians up to T = 1000.
    """
    a = gramian.mean(axis=1)
    s = 1.0
    support = None
    for _ in range(max_iter):
        w = simplex_qp_support(gramian, (s / c) * a, support)
        if w is None:
            return None
        support = w > 0
        exact = _closed_form_on_support(gramian, a, c, support)
        if exact is not None:
            return exact
        s = float(np.sqrt(max(w @ gramian @ w, 0.0)))
        if not s > 0:
            return None
    return None


def _closed_form_on_support(
    gramian: np.ndarray, a: np.ndarray, c: float, support: np.ndarray
) -> np.ndarray | None:
    """The dual's minimiser if its support is ``support``, else None.

    Stationarity on S reads ``a_S + (c/n) G_SS w_S = ν 1`` with ``n = ‖g_w‖``, so
    ``w_S = (n/c) u``, ``u = ν x − y``, ``x = G_SS⁻¹ 1``, ``y = G_SS⁻¹ a_S``; ``n² = wᵀGw`` gives
    ``uᵀ G_SS u = c²``, a quadratic in ``ν`` (the larger root makes ``n > 0``), and ``Σ w = 1``
    gives ``n``. The point is the minimiser when ``w_S > 0`` and the gradient
    ``a + (c/n) G w`` is at least ``ν`` off S (to ``max(10⁻¹², 10 T ε)`` of its largest entry).
    """
    index = np.flatnonzero(support)
    solved = support_solve(gramian, index, a)
    if solved is None:
        return None
    x, y = solved
    sum_x, sum_y, a_y = float(x.sum()), float(y.sum()), float(a[index] @ y)
    discriminant = sum_y**2 - sum_x * (a_y - c**2)
    if not (sum_x > 0 and discriminant > 0):
        return None
    multiplier = (sum_y + np.sqrt(discriminant)) / sum_x
    u = multiplier * x - y  # sums to √discriminant
    w = np.zeros(len(a))
    w[index] = u / u.sum()
    norm = c / u.sum()
    gradient = a + (c / norm) * (gramian @ w)
    tol = max(1e-12, 10 * len(a) * np.finfo(np.float64).eps) * float(np.max(np.abs(gradient)))
    kkt = (
        np.all(w[index] > 0)
        and np.all(gradient[~support] >= multiplier - tol)
        and np.all(np.abs(gradient[index] - multiplier) <= tol)
    )
    return w if kkt else None


def _solve_dual_slsqp(gramian: np.ndarray, c: float) -> np.ndarray:
    """The dual by SciPy's SLSQP (general, slow at many tasks, accurate to ~1e-7 in ``w``)."""
    t = gramian.shape[0]
    gb = gramian.mean(axis=1)

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        gw = gramian @ w
        norm = np.sqrt(max(float(w @ gw), 1e-20))
        return float(w @ gb + c * norm), gb + c * gw / norm

    result = minimize(
        objective,
        np.full(t, 1.0 / t),
        jac=True,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * t,
        constraints=({"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones(t)},),
        options={"ftol": 1e-12, "maxiter": 200},
    )
    w = np.clip(result.x, 0.0, None)
    return w / w.sum()
