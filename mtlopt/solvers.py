"""Small exact solvers on the T×T Gramian, shared by MGDA, CAGrad and later strategies.

Everything here works on float64 NumPy arrays; T is the number of tasks (tens at most), so these run
on the host in microseconds to a few milliseconds.
"""

from __future__ import annotations

import numpy as np


def min_norm_simplex(gramian: np.ndarray, tol: float = 1e-12, max_iter: int = 1000) -> np.ndarray:
    """Weights ``w`` on the simplex minimising ``wᵀ G w``: the min-norm point of the convex hull.

    Wolfe's (1976) active-set algorithm for the nearest point of a polytope, written in terms of
    inner products only, so it needs the Gramian ``G = J Jᵀ`` and never ``J``. It terminates after
    finitely many steps with the exact solution (up to floating point), unlike the Frank-Wolfe
    iterations of the MGDA reference code.
    """
    gramian = np.asarray(gramian, dtype=np.float64)
    t = gramian.shape[0]
    if t == 1:
        return np.ones(1)
    scale = float(np.max(np.abs(np.diag(gramian))))
    if scale == 0.0 or not np.isfinite(scale):
        return np.full(t, 1.0 / t)
    g = gramian / scale
    start = int(np.argmin(np.diag(g)))
    active = [start]
    lam = np.zeros(t)
    lam[start] = 1.0
    for _ in range(max_iter):
        x_dot_p = g @ lam  # ⟨x, p_j⟩ for every vertex j
        x_norm2 = float(lam @ x_dot_p)
        j = int(np.argmin(x_dot_p))
        if x_dot_p[j] >= x_norm2 - tol * max(1.0, x_norm2) or j in active:
            break
        active.append(j)
        while True:  # minor cycle: move to the affine minimiser of the active set, staying feasible
            alpha = _affine_minimiser(g, active)
            if np.all(alpha > tol):
                lam[:] = 0.0
                lam[active] = alpha
                break
            current = lam[active]
            blocking = alpha <= tol
            ratios = current[blocking] / (current[blocking] - alpha[blocking])
            theta = float(np.min(ratios)) if ratios.size else 0.0
            new = current + theta * (alpha - current)
            keep = new > tol
            if not np.any(keep):  # numerical corner: fall back to the best vertex seen
                keep[int(np.argmax(new))] = True
            lam[:] = 0.0
            active = [a for a, k in zip(active, keep, strict=True) if k]
            lam[active] = new[keep] / new[keep].sum()
    lam = np.clip(lam, 0.0, None)
    return lam / lam.sum()


def _affine_minimiser(g: np.ndarray, active: list[int]) -> np.ndarray:
    """Coefficients (summing to one) of the min-norm point of the affine hull of the active vertices."""
    k = len(active)
    kkt = np.zeros((k + 1, k + 1))
    kkt[:k, :k] = g[np.ix_(active, active)]
    kkt[:k, k] = 1.0
    kkt[k, :k] = 1.0
    rhs = np.zeros(k + 1)
    rhs[k] = 1.0
    # An LU solve costs a fraction of lstsq's SVD; lstsq's minimum-norm solution is kept for the
    # degenerate systems (affinely dependent active vertices) where LU fails or is inaccurate.
    try:
        solution = np.linalg.solve(kkt, rhs)
        exact = np.all(np.isfinite(solution)) and np.allclose(kkt @ solution, rhs, atol=1e-10)
    except np.linalg.LinAlgError:
        exact = False
    if not exact:
        solution = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
    return solution[:k]


def fair_weights(gramian: np.ndarray, alpha: float = 1.0, max_iter: int = 100) -> np.ndarray:
    """Positive weights ``w`` with ``(G w)_i = w_i^(-1/α)``: the α-fair allocation.

    For α = 1 this is the Nash bargaining condition ``G w = 1/w`` of Nash-MTL (Navon et al., 2022,
    Eq. 2); for general α it is FairGrad's (Ban & Ji, 2024, Eq. 6).

    The solve runs in the scaled variable ``v = w / d`` with ``d_i = 1/√G_ii``: multiplying the
    condition by ``D = diag(d)`` gives ``(D G D) v = c ⊙ v^(-1/α)`` with ``c = d^(1 − 1/α)``, whose
    matrix has a unit diagonal whatever the spread of the gradient norms. It is the stationarity
    condition of the strictly convex ``f(v) = ½ vᵀ DGD v − Σ_i c_i h(v_i)`` (``h' = v^(-1/α)``,
    ``h = log`` for α = 1), so damped Newton steps inside ``v > 0`` find the unique solution to
    rounding. When none exists (a zero gradient, or 0 in the convex hull of the gradients, where
    ``f`` is unbounded below) the solve is repeated with a ridge of 1e-12 on the unit diagonal,
    which gives every task a finite weight.
    """
    gramian = np.asarray(gramian, dtype=np.float64)
    t = gramian.shape[0]
    trace = float(np.trace(gramian))
    if not trace > 0:
        return np.zeros(t)
    g = gramian / trace
    diagonal = np.diag(g)
    d = 1.0 / np.sqrt(np.where(diagonal > 0, diagonal, 1.0))
    scaled = d[:, None] * g * d[None, :]
    p = 1.0 / alpha
    c = d ** (1.0 - p)
    v = _fair_newton(scaled, c, p, max_iter, strict=True)
    if v is not None and not _solves(scaled, c, p, v):
        v = None  # the iterates ran off to infinity (f unbounded) and stalled in rounding
    if v is None:
        v = _fair_newton(scaled + 1e-12 * np.eye(t), c, p, max_iter, strict=False)
        if v is None:
            raise FloatingPointError("the fairness equations did not converge even with a ridge")
    # Undo the trace normalisation: G w = w^(-p) is homogeneous, w scales by trace^(-1/(1+p)).
    return d * v * trace ** (-1.0 / (1.0 + p))


def _solves(g: np.ndarray, c: np.ndarray, p: float, v: np.ndarray) -> bool:
    """Whether ``(g v)_i = c_i v_i^(-p)`` holds to 1e-6 relative."""
    residual = (g @ v) * v**p / c - 1.0
    return bool(np.all(np.abs(residual) < 1e-6))


def _fair_newton(
    g: np.ndarray, c: np.ndarray, p: float, max_iter: int, strict: bool
) -> np.ndarray | None:
    """Damped Newton on ``½ vᵀ g v − Σ c_i h(v_i)``, then pure Newton steps until rounding stops
    them. ``strict``: None unless the Newton decrement fell below 1e-8 (f may be unbounded, with
    no solution); otherwise the last iterate."""
    accept = 1e-8 if strict else np.inf

    def h(v: np.ndarray) -> np.ndarray:
        return np.log(v) if p == 1.0 else v ** (1.0 - p) / (1.0 - p)

    def objective(v: np.ndarray) -> float:
        return float(0.5 * v @ g @ v - c @ h(v))

    v = c ** (1.0 / (1.0 + p))  # the solution when the gradients are orthogonal
    previous, pure = np.inf, False
    for _ in range(max_iter):
        gradient = g @ v - c * v ** (-p)
        hessian = g + np.diag(p * c * v ** (-p - 1.0))
        try:
            step = np.linalg.solve(hessian, gradient)
        except np.linalg.LinAlgError:
            return None
        decrement = float(gradient @ step)  # Newton decrement λ², ≈ 2 (f(v) − f*)
        if not np.isfinite(decrement):
            return None
        if decrement < 1e-12 or pure:
            # Pure Newton steps: near the solution they converge quadratically; they stop when
            # rounding stops the decrement from falling.
            candidate = v - step
            if decrement >= previous or not np.all(candidate > 0):
                return v if min(decrement, previous) < accept else None
            v, previous = candidate, decrement
            continue
        scale = 1.0
        positive = step > 0
        if np.any(positive):  # stay strictly inside v > 0
            scale = min(1.0, 0.99 * float(np.min(v[positive] / step[positive])))
        value = objective(v)
        slack = 1e-13 * (abs(value) + 1.0)  # Armijo up to the rounding of f itself
        while objective(v - scale * step) > value - 1e-4 * scale * decrement + slack:
            scale *= 0.5
            if scale < 1e-12:
                break
        if scale < 1e-12:
            # f itself is lost in rounding (large, nearly cancelling v): from here on its
            # gradient, which stays accurate, guides pure Newton steps.
            pure = True
            continue
        v = v - scale * step
    return v if previous < accept or not strict else None


def project_dual_cone(gramian: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """Weights ``v = argmin_{v ≥ lower} vᵀ G v``, for one ``lower`` vector or each row of a matrix.

    ``Jᵀ v`` is then the projection of ``Jᵀ lower`` onto the dual cone ``{x : J x ≥ 0}`` of the
    task gradients (Quinton & Rey, 2024, Prop. 1). With ``v = lower + z`` and ``G = Lᵀ L`` this is
    the non-negative least-squares problem ``min_{z ≥ 0} ‖L z + L lower‖²``, solved exactly by the
    Lawson–Hanson active-set method. ``G`` is factorised once for all rows, and a row whose
    ``G lower`` is already non-negative (KKT holds at ``z = 0``: ``Jᵀ lower`` conflicts with no
    task) is its own projection and costs no solve.
    """
    from scipy.optimize import nnls

    gramian = np.asarray(gramian, dtype=np.float64)
    lower = np.asarray(lower, dtype=np.float64)
    rows = np.atleast_2d(lower)
    result = rows.copy()
    scale = float(np.max(np.abs(np.diag(gramian))))
    if scale > 0:
        unit = gramian / scale
        conflicting = np.flatnonzero(np.any(rows @ unit < 0, axis=1))
        if conflicting.size:
            eigenvalues, eigenvectors = np.linalg.eigh(unit)
            root = np.sqrt(np.clip(eigenvalues, 0.0, None))[:, None] * eigenvectors.T
            targets = -rows[conflicting] @ root.T
            for k, target in zip(conflicting, targets, strict=True):
                z, _ = nnls(root, target, maxiter=50 * len(gramian))
                result[k] += z
    return result.reshape(lower.shape)
