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
    Eq. 2); for general α it is FairGrad's (Ban & Ji, 2024, Eq. 6). The condition is the
    stationarity of the strictly convex ``f(w) = ½ wᵀ G w − Σ_i h(w_i)`` with ``h' (w) = w^(-1/α)``
    (``h = log`` for α = 1), so damped Newton steps inside ``w > 0`` find the unique solution. A
    ridge of 1e-10·tr(G) keeps ``f`` bounded when the gradients are linearly dependent.
    """
    gramian = np.asarray(gramian, dtype=np.float64)
    t = gramian.shape[0]
    trace = float(np.trace(gramian))
    if not trace > 0:
        return np.zeros(t)
    g = gramian / trace + 1e-12 * np.eye(t)
    p = 1.0 / alpha

    def h(w: np.ndarray) -> np.ndarray:
        return np.log(w) if alpha == 1.0 else w ** (1.0 - p) / (1.0 - p)

    def objective(w: np.ndarray) -> float:
        return float(0.5 * w @ g @ w - np.sum(h(w)))

    w = np.full(t, 1.0 / np.sqrt(max(float(np.sum(g)), 1e-300)))
    for _ in range(max_iter):
        gradient = g @ w - w ** (-p)
        hessian = g + np.diag(p * w ** (-p - 1.0))
        step = np.linalg.solve(hessian, gradient)
        decrement = float(gradient @ step)  # Newton decrement λ², ≈ 2 (f(w) − f*)
        if decrement < 1e-12:
            # Quadratic convergence: one full step brings the error to rounding level; a line
            # search would only fight rounding from here.
            candidate = w - step
            if np.all(candidate > 0):
                w = candidate
            break
        scale = 1.0
        positive = step > 0
        if np.any(positive):  # stay strictly inside w > 0
            scale = min(1.0, 0.99 * float(np.min(w[positive] / step[positive])))
        value = objective(w)
        while objective(w - scale * step) > value - 1e-4 * scale * decrement:
            scale *= 0.5
            if scale < 1e-12:
                break
        if scale < 1e-12:
            break
        w = w - scale * step
    # Undo the trace normalisation: G w = w^(-p) is homogeneous, w scales by trace^(-1/(1+p)).
    return w * trace ** (-1.0 / (1.0 + p))


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
