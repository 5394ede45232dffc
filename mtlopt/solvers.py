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
    solution = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
    return solution[:k]


def project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto the probability simplex (Duchi et al., 2008)."""
    v = np.asarray(v, dtype=np.float64)
    u = np.sort(v)[::-1]
    cumulative = np.cumsum(u) - 1.0
    index = np.arange(1, v.size + 1)
    rho = np.nonzero(u - cumulative / index > 0)[0][-1]
    return np.maximum(v - cumulative[rho] / (rho + 1), 0.0)
