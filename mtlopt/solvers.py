"""Small exact solvers on the T×T Gramian, shared by MGDA, CAGrad and later strategies.

Everything here works on float64 NumPy arrays on the host; T is the number of tasks. The solvers
are exact (KKT conditions checked to rounding) and written to scale to about a thousand tasks: see
the many-task solver table of docs/perf.md.
"""

from __future__ import annotations

import numpy as np
import torch

_TORCH_MATMUL_WORK = 300**3
"""Products of at least this many multiply-adds go through torch: on this project's CPUs its
float64 kernels (MKL) ran a 1000×1000 product 1.5× faster than NumPy's OpenBLAS, while below
about 300³ NumPy's lower call overhead wins (docs/perf.md, the many-task solver table)."""


def matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``a @ b`` for 2-D float arrays of one dtype (written into ``out`` when given), large products
    through torch's kernels on the same memory (no copies)."""
    if (
        a.dtype != b.dtype
        or a.shape[0] * a.shape[1] * b.shape[1] < _TORCH_MATMUL_WORK
        or min(*a.strides, *b.strides, *(out.strides if out is not None else ())) < 0
    ):
        return np.matmul(a, b, out=out)  # small, mixed, or views torch cannot share (reversed)
    if out is None:
        return torch.from_numpy(a).mm(torch.from_numpy(b)).numpy()
    torch.mm(torch.from_numpy(a), torch.from_numpy(b), out=torch.from_numpy(out))
    return out


def min_norm_simplex(gramian: np.ndarray, tol: float = 1e-12, max_iter: int = 1000) -> np.ndarray:
    """Weights ``w`` on the simplex minimising ``wᵀ G w``: the min-norm point of the convex hull.

    Solved from the Gramian ``G = J Jᵀ`` alone, never ``J``, exactly (up to floating point),
    unlike the Frank-Wolfe iterations of the MGDA reference code: first by a primal-dual active
    set method on the support (:func:`_min_norm_support`, a few Cholesky factorisations), and
    where that does not apply (singular or ill-conditioned ``G``) by Wolfe's (1976) active-set
    algorithm for the nearest point of a polytope, which adds one vertex per step.
    """
    gramian = np.asarray(gramian, dtype=np.float64)
    t = gramian.shape[0]
    if t == 1:
        return np.ones(1)
    scale = float(np.max(np.abs(np.diag(gramian))))
    if scale == 0.0 or not np.isfinite(scale):
        return np.full(t, 1.0 / t)
    g = gramian / scale
    exact = _min_norm_support(g)
    return exact if exact is not None else _min_norm_wolfe(g, tol, max_iter)


def _min_norm_wolfe(g: np.ndarray, tol: float = 1e-12, max_iter: int = 1000) -> np.ndarray:
    """Wolfe's (1976) method on a Gramian scaled to unit largest diagonal (see
    :func:`min_norm_simplex`)."""
    t = g.shape[0]
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


def _min_norm_support(g: np.ndarray) -> np.ndarray | None:
    """The min-norm point of the simplex by :func:`simplex_qp_support` (no linear term)."""
    return simplex_qp_support(g, np.zeros(g.shape[0]))


def simplex_qp_support(
    g: np.ndarray,
    linear: np.ndarray,
    support: np.ndarray | None = None,
    max_iter: int = 50,
) -> np.ndarray | None:
    """``argmin_{w ∈ Δ} ½ wᵀ G w + qᵀ w`` by a primal-dual active-set method on the support (as
    Hintermüller, Ito & Kunisch, 2002, for bound constraints), or None where it does not apply.

    On a support S the minimiser over ``Σ w = 1`` solves ``G_SS w_S + q_S = ν 1``: with one
    Cholesky factorisation of ``G_SS``, ``w_S = G_SS⁻¹ (ν 1 − q_S)`` and ``ν`` from the sum. Then
    the tasks with ``w_j ≤ 0`` leave S and those with ``(G w + q)_j < ν`` (their bound's multiplier
    negative) join it, starting from ``support`` (default: every task). A few such steps (three
    for the min-norm point of a random Gaussian Gramian at T = 1000) replace the one vertex per
    step of Wolfe's method. The answer is returned only where its KKT conditions hold to
    ``τ = max(10⁻¹², 10 T ε) · max(1, max_j |(G w + q)_j|)`` (``G`` scaled to unit largest
    diagonal): ``(G w + q)_j ≥ ν − τ`` for all j, equality within τ on the support. None where a
    support's ``G_SS`` is not positive definite to Cholesky, a support repeats (the method can
    cycle) or ``max_iter`` steps pass: the caller then runs a method that always applies.
    """

    t = g.shape[0]
    rel = max(1e-12, 10 * t * np.finfo(np.float64).eps)
    support = np.ones(t, dtype=bool) if support is None else support.copy()
    seen: set[bytes] = set()
    for _ in range(max_iter):
        key = np.packbits(support).tobytes()
        if key in seen or not support.any():
            return None
        seen.add(key)
        index = np.flatnonzero(support)
        solved = support_solve(g, index, linear)
        if solved is None:
            return None
        x, y = solved
        total = float(x.sum())
        if not (np.isfinite(total) and total > 0):
            return None
        multiplier = (1.0 + float(y.sum())) / total
        w = np.zeros(t)
        w[index] = multiplier * x - y
        gradient = g @ w + linear
        tol = rel * max(1.0, float(np.max(np.abs(gradient))))
        leave = w[index] <= 0
        join = ~support & (gradient < multiplier - tol)
        if not leave.any() and not join.any():
            exact = np.all(np.abs(gradient[index] - multiplier) <= tol)
            return w / w.sum() if exact else None
        support[index[leave]] = False
        support |= join
    return None


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
    task gradients (Quinton & Rey, 2024, Prop. 1). With ``v = lower + z`` each row is the bound
    constrained QP ``min_{z ≥ 0} ½ (l + z)ᵀ G (l + z)``, whose KKT conditions are ``G v ≥ 0`` and
    ``(G v)_j = 0`` wherever ``z_j > 0``. A row whose ``G lower`` is already non-negative (KKT holds
    at ``z = 0``: ``Jᵀ lower`` conflicts with no task) is its own projection and costs no solve.
    The other rows share ``G`` and are solved together by :func:`_project_rows` (an active-set
    method whose linear algebra is one matrix product with ``G`` per iteration for all rows);
    a row whose KKT conditions it does not meet to rounding (very ill-conditioned ``G``) is solved
    again by the Lawson–Hanson active-set method (:func:`_project_row_nnls`).
    """
    unit, rows, conflicting, scale = _conflicting_rows(gramian, lower)
    result = rows.copy()
    if conflicting.size:
        targets = rows[conflicting]
        z, solved = _project_rows(unit, targets, _projected_gradient(unit, targets))
        result[conflicting] += z
        unsolved = conflicting[~solved]
        if unsolved.size:
            root = _square_root(unit)
            for k in unsolved:
                result[k] = rows[k] + _project_row_nnls(root, rows[k])
    return (result / scale).reshape(np.shape(lower))


def _conflicting_rows(
    gramian: np.ndarray, lower: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The problem :func:`project_dual_cone` solves, in the variables ``v̂ = D v`` with
    ``D = diag(√G_jj)`` (``1`` where ``G_jj = 0``): the Gramian ``D⁻¹ G D⁻¹`` of the normalised
    task gradients, the rows ``D l`` of ``lower`` (2-D, float64), the indices of the rows whose
    combination ``Jᵀ lower`` conflicts with some task (the only rows that need a projection; none
    when ``G`` is zero), and ``D``'s diagonal. A positive diagonal change of variables keeps the
    bounds ``v ≥ l`` bounds and the KKT signs ``(G v)_j ≥ 0`` signs, so the solution maps back
    exactly as ``v = D⁻¹ v̂``; it is Jacobi preconditioning for the conjugate gradients of
    :func:`_project_rows`, whose iterations otherwise grow with the spread of the task
    gradients' norms (docs/perf.md, the many-task solver table)."""
    gramian = np.asarray(gramian, dtype=np.float64)
    rows = np.atleast_2d(np.asarray(lower, dtype=np.float64))
    diagonal = np.diag(gramian)
    scale = np.sqrt(np.where(diagonal > 0, diagonal, 1.0))
    if not np.any(diagonal > 0):
        return gramian, rows, np.zeros(0, dtype=np.int64), scale
    unit = gramian / scale[:, None] / scale[None, :]
    rows = rows * scale
    return unit, rows, np.flatnonzero(np.any(matmul(rows, unit) < 0, axis=1)), scale


def _square_root(gramian: np.ndarray) -> np.ndarray:
    """``R`` with ``Rᵀ R = G`` (symmetric eigendecomposition, negative rounding clipped)."""
    eigenvalues, eigenvectors = np.linalg.eigh(gramian)
    return np.sqrt(np.clip(eigenvalues, 0.0, None))[:, None] * eigenvectors.T


def _project_row_nnls(root: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """``z = argmin_{z ≥ 0} ‖R z + R lower‖²`` by Lawson–Hanson (SciPy's ``nnls``)."""
    from scipy.optimize import nnls

    z, _ = nnls(root, -root @ lower, maxiter=50 * len(root))
    return z


def _project_dual_cone_nnls(gramian: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """:func:`project_dual_cone` row by row with Lawson–Hanson only: the reference the batched
    solver is tested against (and the method it falls back to)."""
    unit, rows, conflicting, scale = _conflicting_rows(gramian, lower)
    result = rows.copy()
    if conflicting.size:
        root = _square_root(unit)
        for k in conflicting:
            result[k] += _project_row_nnls(root, rows[k])
    return (result / scale).reshape(np.shape(lower))


def _projected_gradient(gramian: np.ndarray, lower: np.ndarray, max_iter: int = 20) -> np.ndarray:
    """A rough ``argmin_{z ≥ 0} ½ (l + z)ᵀ G (l + z)`` for every row: a few iterations of
    accelerated projected gradient (FISTA, Beck & Teboulle, 2009) in float32, stopped early once
    the rows' supports have not changed for three iterations. It only warm-starts
    :func:`_project_rows`, whose exactness owes nothing to it (float32 rounding and a loose step
    size cost iterations there, not accuracy)."""
    t = gramian.shape[0]
    if t > 64:
        from scipy.sparse.linalg import ArpackError, eigsh

        try:
            # A fixed start vector: ARPACK's own random one would make runs differ in rounding.
            start = np.full(t, 1.0 / np.sqrt(t))
            top = float(
                eigsh(gramian, k=1, which="LA", v0=start, return_eigenvectors=False, tol=1e-3)[0]
            )
        except ArpackError:
            top = float(np.max(np.abs(gramian).sum(axis=1)))  # Gershgorin: slower but safe
    else:
        top = float(np.linalg.eigvalsh(gramian)[-1])
    if not (np.isfinite(top) and top > 0):
        return np.zeros_like(lower)
    step = np.float32(1.0 / (1.05 * top))
    g = gramian.astype(np.float32)
    offset = matmul(lower, gramian).astype(np.float32)  # the gradient at z = 0
    z = np.zeros_like(offset)
    y, momentum, stable, support = z, 1.0, 0, z > 0
    for _ in range(max_iter):
        new = matmul(y, g)
        new += offset
        new *= -step
        new += y
        np.maximum(new, 0.0, out=new)
        following = (1.0 + np.sqrt(1.0 + 4.0 * momentum**2)) / 2.0
        y = new - z
        y *= np.float32((momentum - 1.0) / following)
        y += new
        z, momentum = new, following
        new_support = z > 0
        stable = stable + 1 if np.array_equal(new_support, support) else 0
        support = new_support
        if stable >= 3:
            break
    z = z.astype(np.float64)
    return z if np.all(np.isfinite(z)) else np.zeros_like(lower)


def _project_rows(
    gramian: np.ndarray,
    lower: np.ndarray,
    start: np.ndarray | None = None,
    max_iter: int | None = None,
    max_bends: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """``z_k = argmin_{z ≥ 0} ½ (l_k + z)ᵀ G (l_k + z)`` for every row ``l_k`` of ``lower`` at once.

    A primal active-set method in the style of Polyak's and of Moré & Toraldo's (1991) GPCG,
    vectorised over the rows: each row runs conjugate gradients on its free set (``z_j > 0``, plus
    the bounds whose multiplier ``(G v)_j`` is negative). A CG step that would leave ``z ≥ 0`` is
    taken in full and projected back onto ``z ≥ 0`` (projected search: many bounds met at once)
    for a row's first ``max_bends`` such steps, and afterwards cut at the first bound it meets,
    which leaves the free set; either way the row's CG restarts. When CG has converged on the
    free set, every bound with a negative multiplier joins it and CG restarts. Once the bends are
    spent the objective decreases at every step. It starts from ``start`` (a warm start,
    projected onto ``z ≥ 0``; zero by default). All rows advance together, so an iteration costs
    one product ``P G`` of the unconverged rows' search directions with the shared ``G``. A row
    is solved when
    its KKT conditions hold to rounding, recomputed from ``v`` itself: ``(G v)_j ≥ −τ`` for all j
    and ``|(G v)_j| ≤ τ`` where ``z_j > 0``, ``τ = 10 T ε max_j |G_jj| ‖v‖₁`` (``G`` is scaled to
    a unit largest diagonal). The second output says which rows are solved.
    """
    n, t = lower.shape
    eps = np.finfo(np.float64).eps
    max_iter = 3 * t + 100 if max_iter is None else max_iter
    result = np.zeros((n, t))
    solved = np.zeros(n, dtype=bool)
    ids = np.arange(n)
    low = np.array(lower, dtype=np.float64)
    z = np.zeros((n, t)) if start is None else np.maximum(start, 0.0)
    residual = np.zeros((n, t))
    direction = np.zeros((n, t))
    free = np.zeros((n, t), dtype=bool)
    squared = np.zeros(n)
    tolerance = np.zeros(n)
    refresh = np.ones(n, dtype=bool)
    bends = np.zeros(n, dtype=int)
    # Preallocated work space (fresh 8 MB temporaries are page-faulted on every allocation).
    products_space, scratch_space = np.empty((n, t)), np.empty((n, t))
    for _ in range(max_iter):
        if refresh.any():
            # Recompute the multipliers G v of these rows, check KKT, rebuild their free sets.
            rows = np.flatnonzero(refresh)
            v = low[rows] + z[rows]
            multipliers = matmul(v, gramian)
            tol = 10 * t * eps * np.abs(v).sum(axis=1)
            positive = z[rows] > 0
            violation = np.maximum(
                np.max(np.abs(multipliers) * positive, axis=1), np.max(-multipliers, axis=1)
            )
            f = positive | (multipliers < -tol[:, None])
            r = np.where(f, -multipliers, 0.0)
            residual[rows], direction[rows], free[rows] = r, r, f
            squared[rows] = np.einsum("ij,ij->i", r, r)
            tolerance[rows] = tol
            done = rows[violation <= tol]
            if done.size:
                result[ids[done]] = z[done]
                solved[ids[done]] = True
                keep = np.ones(ids.size, dtype=bool)
                keep[done] = False
                ids, low, z, residual, direction, free, squared, tolerance, bends = (
                    a[keep]
                    for a in (ids, low, z, residual, direction, free, squared, tolerance, bends)
                )
                if ids.size == 0:
                    break
        q, scratch = products_space[: ids.size], scratch_space[: ids.size]
        matmul(direction, gramian, out=q)
        q *= free
        curvature = np.einsum("ij,ij->i", direction, q)
        alpha = squared / np.where(curvature > 0, curvature, np.inf)
        # The longest step keeping z ≥ 0 is min over p_j < 0 of z_j / −p_j: the first bound met
        # is the most negative p_j / z_j (z_j = 0 with p_j < 0: a step of 0).
        np.add(z, 1e-300, out=scratch)
        np.divide(direction, scratch, out=scratch)
        block = np.argmin(scratch, axis=1)
        lowest = scratch[np.arange(ids.size), block]
        limit = np.where(lowest < 0, -1.0 / np.where(lowest < 0, lowest, -1.0), np.inf)
        cut = limit < alpha
        bend = cut & (bends < max_bends)
        alpha = np.where(cut & ~bend, limit, alpha)
        step = torch.from_numpy(alpha[:, None])
        torch.from_numpy(z).addcmul_(torch.from_numpy(direction), step)
        cut_rows = np.flatnonzero(cut)
        if cut_rows.size:
            exact = np.flatnonzero(cut & ~bend)
            z[exact, block[exact]] = 0.0
            z[cut_rows] = np.maximum(z[cut_rows], 0.0)
            bends += bend
        torch.from_numpy(residual).addcmul_(torch.from_numpy(q), step, value=-1.0)
        new_squared = np.einsum("ij,ij->i", residual, residual)
        # Rows to look at afresh: a bound was met, or CG converged on the free set.
        refresh = cut | (new_squared <= tolerance**2) | (curvature <= 0)
        beta = np.where(refresh, 0.0, new_squared / np.where(squared > 0, squared, 1.0))
        d = torch.from_numpy(direction)
        torch.addcmul(torch.from_numpy(residual), d, torch.from_numpy(beta[:, None]), out=d)
        squared = new_squared
    return result, solved


def support_solve(
    gramian: np.ndarray, index: np.ndarray, linear: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """``G_SS⁻¹ 1`` and ``G_SS⁻¹ a_S`` on the support ``S = index`` by one Cholesky
    factorisation (``None`` where ``G_SS`` is not positive definite): the two solves the
    active-set methods on the simplex (MGDA's, CAGrad's) combine."""
    from scipy.linalg import cho_factor, cho_solve

    try:
        factor = cho_factor(gramian[np.ix_(index, index)], check_finite=False)
    except np.linalg.LinAlgError:
        return None
    right = np.stack([np.ones(index.size), linear[index]], axis=1)
    x, y = cho_solve(factor, right, check_finite=False).T
    return x, y
