import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from mtlopt.solvers import matmul, min_norm_simplex, project_dual_cone


def _gramian(tasks, dim, seed, rank=None):
    rng = np.random.default_rng(seed)
    j = rng.standard_normal((tasks, dim))
    if rank is not None:
        j = rng.standard_normal((tasks, rank)) @ rng.standard_normal((rank, dim))
    return j @ j.T


@settings(max_examples=60, deadline=None)
@given(tasks=st.integers(1, 30), dim=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_min_norm_satisfies_kkt(tasks, dim, seed):
    """KKT of min wᵀGw on the simplex: (Gw)_j ≥ wᵀGw for all j, with equality on the support."""
    g = _gramian(tasks, dim, seed)
    w = min_norm_simplex(g)
    assert w.min() >= 0 and abs(w.sum() - 1) < 1e-12
    gw = g @ w
    value = w @ gw
    scale = np.abs(g).max()
    assert np.all(gw >= value - 1e-8 * scale)
    assert np.all(np.abs(gw[w > 1e-9] - value) <= 1e-7 * scale)


@pytest.mark.parametrize("seed", range(10))
def test_min_norm_beats_a_general_solver(seed):
    g = _gramian(8, 5, seed)  # rank-deficient: 8 gradients in 5 dimensions
    w = min_norm_simplex(g)
    reference = minimize(
        lambda x: x @ g @ x,
        np.full(8, 1 / 8),
        jac=lambda x: 2 * g @ x,
        method="SLSQP",
        bounds=[(0, 1)] * 8,
        constraints=({"type": "eq", "fun": lambda x: x.sum() - 1},),
        options={"ftol": 1e-15, "maxiter": 500},
    )
    assert w @ g @ w <= reference.fun + 1e-10


def test_min_norm_two_tasks_closed_form():
    """For two gradients the solution is γ = clip((g2−g1)·g2 / ‖g1−g2‖², 0, 1) (Sener & Koltun, Alg. 1)."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        j = rng.standard_normal((2, 4))
        gamma = np.clip((j[1] - j[0]) @ j[1] / np.sum((j[0] - j[1]) ** 2), 0, 1)
        np.testing.assert_allclose(min_norm_simplex(j @ j.T), [gamma, 1 - gamma], atol=1e-10)


def test_min_norm_degenerate_inputs():
    assert np.allclose(min_norm_simplex(np.zeros((3, 3))), 1 / 3)
    assert np.allclose(min_norm_simplex(np.ones((1, 1))), [1.0])
    w = min_norm_simplex(
        np.ones((4, 4))
    )  # identical gradients: any point of the simplex is optimal
    assert np.isclose(w.sum(), 1) and np.all(w >= 0)


@settings(max_examples=60, deadline=None)
@given(tasks=st.integers(1, 25), dim=st.integers(1, 30), seed=st.integers(0, 2**31 - 1))
def test_dual_cone_projection_satisfies_kkt_for_every_row(tasks, dim, seed):
    """KKT of min vᵀGv s.t. v ≥ e_i, for all rows i at once: Gv ≥ 0 (dual feasibility, which makes
    Jᵀv conflict with no task), and (Gv)_j = 0 wherever v_j > e_ij (complementary slackness)."""
    g = _gramian(tasks, dim, seed) + 1e-6 * np.eye(tasks)
    lower = np.eye(tasks)
    v = project_dual_cone(g, lower)
    scale = np.abs(g).max()
    assert v.shape == lower.shape and np.all(v >= lower - 1e-12)
    gv = v @ g
    assert np.all(gv >= -1e-6 * scale * np.abs(v).sum(axis=1, keepdims=True))
    slack = v - lower > 1e-9
    assert np.all(
        np.abs(gv[slack]) <= 1e-6 * scale * np.abs(v).sum(axis=1).repeat(tasks)[slack.ravel()]
    )


@pytest.mark.parametrize("seed", range(5))
def test_dual_cone_rows_at_once_equal_one_at_a_time(seed):
    """Mixed rows, some conflicting with no task (their own projection), some needing a solve."""
    rng = np.random.default_rng(seed)
    j = np.zeros((12, 6))
    j[:10, 0] = 1.0
    j[:10, 1:5] = 0.1 * rng.standard_normal((10, 4))  # ten nearly aligned tasks
    j[10, :2] = [-1.0, 1.0]  # conflicts with the ten
    j[11, 5] = 1.0  # orthogonal to all: conflicts with none
    g = j @ j.T
    lower = np.vstack([np.eye(12), np.full(12, 1 / 12)])
    together = project_dual_cone(g, lower)
    apart = np.stack([project_dual_cone(g, row) for row in lower])
    np.testing.assert_allclose(together, apart, rtol=1e-12, atol=1e-14)
    assert np.array_equal(together[11], lower[11])  # no conflict: its own projection
    assert not np.array_equal(together[10], lower[10])  # conflicting: solved


def _kkt_violation(g, lower, v):
    """Largest violation of the KKT conditions of min vᵀGv s.t. v ≥ lower, row by row, relative
    to max|G| ‖v‖₁: primal (v ≥ lower), dual (Gv ≥ 0) and complementary slackness."""
    gv = v @ g
    scale = np.abs(g).max() * np.abs(v).sum(axis=1, keepdims=True)
    slack = v - lower > 1e-9 * np.abs(v).sum(axis=1, keepdims=True)
    return max(
        float(np.max(lower - v, initial=0.0)),
        float(np.max(-gv / scale, initial=0.0)),
        float(np.max(np.abs(gv / scale)[slack], initial=0.0)),
    )


@pytest.mark.parametrize(
    ("tasks", "dim", "rank", "ridge"),
    [(5, 3, None, 1e-4), (40, 80, None, 1e-4), (60, 30, None, 0.0), (60, 200, 10, 1e-4),
     (120, 240, None, 1e-4), (200, 400, None, 1e-4), (200, 400, 50, 1e-4)],
)
def test_batched_dual_cone_projection_equals_lawson_hanson(tasks, dim, rank, ridge):
    """The batched active-set solver against row-by-row Lawson–Hanson (scipy's nnls), on the
    trace-normalised Gramian UPGrad projects with, including rank-deficient gradients."""
    from mtlopt.solvers import _project_dual_cone_nnls

    g = _gramian(tasks, dim, tasks + dim, rank)
    g = g / np.trace(g) + ridge * np.eye(tasks)
    lower = np.vstack([np.eye(tasks), np.full(tasks, 1 / tasks)])
    v = project_dual_cone(g, lower)
    assert _kkt_violation(g, lower, v) < 1e-11
    reference = _project_dual_cone_nnls(g, lower)
    if ridge > 0:  # strictly convex: v is unique
        np.testing.assert_allclose(v, reference, rtol=0, atol=1e-9)
    else:  # dependent gradients: v may not be unique, Jᵀv (hence vᵀGv) is
        np.testing.assert_allclose(
            np.einsum("ij,jk,ik->i", v, g, v),
            np.einsum("ij,jk,ik->i", reference, g, reference),
            rtol=1e-9,
            atol=1e-14,
        )


@pytest.mark.parametrize("seed", range(3))
def test_dual_cone_projection_without_ridge_on_rank_deficient_gradients(seed):
    """No ridge, 30 tasks in 6 dimensions (G singular): KKT still holds to rounding and the
    projected gradient equals the reference's."""
    from mtlopt.solvers import _project_dual_cone_nnls

    rng = np.random.default_rng(seed)
    j = rng.standard_normal((30, 6))
    g = j @ j.T
    v = project_dual_cone(g, np.eye(30))
    assert _kkt_violation(g, np.eye(30), v) < 1e-9
    np.testing.assert_allclose(
        v @ j, _project_dual_cone_nnls(g, np.eye(30)) @ j, rtol=0, atol=1e-8 * np.abs(j).max()
    )


def test_dual_cone_projection_solves_spread_gradient_norms_without_fallback(monkeypatch):
    """80 task gradients whose norms span e⁶ ≈ 400×, no ridge: the batched solver (Jacobi scaled)
    solves every row itself (it used to solve 1 of 80 and hand 79 to Lawson–Hanson), and the
    answer is Lawson–Hanson's."""
    import mtlopt.solvers as solvers

    rng = np.random.default_rng(0)
    j = rng.standard_normal((80, 160)) * np.exp(rng.uniform(-3, 3, (80, 1)))
    g = j @ j.T
    reference = solvers._project_dual_cone_nnls(g, np.eye(80))

    def refuse(root, lower):
        raise AssertionError("a row fell back to Lawson-Hanson")

    monkeypatch.setattr(solvers, "_project_row_nnls", refuse)
    v = project_dual_cone(g, np.eye(80))
    assert _kkt_violation(g, np.eye(80), v) < 1e-9
    np.testing.assert_allclose(v, reference, rtol=1e-8, atol=1e-10)


def test_rows_left_unsolved_fall_back_to_lawson_hanson(monkeypatch):
    """A row the batched solver reports unsolved is solved by nnls: same answer."""
    import mtlopt.solvers as solvers

    g = _gramian(20, 40, 3)
    expected = project_dual_cone(g, np.eye(20))
    batched = solvers._project_rows

    def give_up(gramian, lower, start=None, max_iter=None):
        return batched(gramian, lower, start, max_iter=2)

    monkeypatch.setattr(solvers, "_project_rows", give_up)
    assert not batched(g / g.diagonal().max(), np.eye(20), max_iter=2)[1].all()
    np.testing.assert_allclose(project_dual_cone(g, np.eye(20)), expected, atol=1e-10)


@pytest.mark.parametrize(
    ("tasks", "dim", "rank"), [(60, 120, None), (200, 400, None), (150, 100, None), (80, 300, 20)]
)
def test_min_norm_active_set_equals_wolfe(tasks, dim, rank):
    """The support active-set method (or its Wolfe fallback) against Wolfe's method alone: the
    same min-norm point, and the KKT conditions of the simplex QP hold to rounding."""
    from mtlopt.solvers import _min_norm_wolfe

    g = _gramian(tasks, dim, tasks * dim, rank)
    w = min_norm_simplex(g)
    gw, value = g @ w, w @ g @ w
    scale = g.diagonal().max()
    assert w.min() >= 0 and abs(w.sum() - 1) < 1e-12
    assert np.all(gw >= value - 1e-11 * scale)
    assert np.all(np.abs(gw[w > 0] - value) <= 1e-11 * scale)
    reference = _min_norm_wolfe(g / scale)
    assert abs(value - reference @ g @ reference) <= 1e-11 * scale
    if rank is None and dim >= tasks:  # G positive definite: the weights are unique
        np.testing.assert_allclose(w, reference, atol=1e-10)


def _cagrad_dual_objective(g, c):
    a = g.mean(axis=1)
    return lambda w: w @ a + c * np.sqrt(w @ g @ w)


@pytest.mark.parametrize("c", [0.1, 0.4, 1.0, 2.0])
@pytest.mark.parametrize(("tasks", "seed"), [(3, 0), (12, 1), (60, 2), (200, 3)])
def test_cagrad_dual_satisfies_kkt_and_beats_slsqp(tasks, seed, c):
    """CAGrad's dual min_{w ∈ Δ} wᵀGb + c√(wᵀGw) (Liu et al., 2021, Eq. 5): the support method
    answers (full-rank G), its KKT conditions hold (the gradient a + c Gw/‖g_w‖ is minimal and
    equal on the support), and its objective is no worse than SLSQP's."""
    from mtlopt.strategies.cagrad import _solve_dual, _solve_dual_on_support, _solve_dual_slsqp

    g = _gramian(tasks, 2 * tasks, seed)
    mean = np.full(tasks, 1 / tasks)
    g = g / (mean @ g @ mean)
    assert _solve_dual_on_support(g, c) is not None
    w = _solve_dual(g, c)
    assert w.min() >= 0 and abs(w.sum() - 1) < 1e-12
    gradient = g.mean(axis=1) + c * (g @ w) / np.sqrt(w @ g @ w)
    scale = np.abs(gradient).max()
    floor = gradient[w > 0].min()
    assert np.all(gradient >= floor - 1e-11 * scale)
    assert np.all(gradient[w > 0] - floor <= 1e-11 * scale)
    objective = _cagrad_dual_objective(g, c)
    assert objective(w) <= objective(_solve_dual_slsqp(g, c)) + 1e-12 * abs(objective(w))


@pytest.mark.parametrize("seed", range(5))
def test_cagrad_dual_two_tasks_by_brute_force(seed):
    """T = 2: the dual is one-dimensional in w = (γ, 1 − γ); a fine grid then bounded scalar
    minimisation gives γ independently."""
    from scipy.optimize import minimize_scalar

    from mtlopt.strategies.cagrad import _solve_dual

    g = _gramian(2, 3, seed)
    g = g / (np.full(2, 0.5) @ g @ np.full(2, 0.5))
    objective = _cagrad_dual_objective(g, 0.4)
    grid = np.linspace(0, 1, 10001)
    values = [objective(np.array([x, 1 - x])) for x in grid]
    best = grid[int(np.argmin(values))]
    low, high = max(0.0, best - 1e-4), min(1.0, best + 1e-4)
    gamma = minimize_scalar(
        lambda x: objective(np.array([x, 1 - x])), bounds=(low, high), method="bounded",
        options={"xatol": 1e-12},
    ).x
    np.testing.assert_allclose(_solve_dual(g, 0.4), [gamma, 1 - gamma], atol=1e-6)


@pytest.mark.parametrize(
    ("tasks", "dim", "tau"), [(5, 8, 0.02), (40, 80, 0.02), (40, 20, 0.3), (200, 400, 0.02)]
)
def test_pcd_dual_active_set_equals_lawson_hanson(tasks, dim, tau):
    """PCD's dual min_{μ ≥ 0} ½ μᵀHμ − bᵀμ: the primal-dual active-set method and Lawson–Hanson
    (the previous solver) give the same μ, which meets the KKT conditions (H μ ≥ b − tol,
    equality where μ > 0), also with more secondary tasks than dimensions (ridge only)."""
    from mtlopt.strategies.pcd import _lawson_hanson, _nonnegative_qp_support

    g = _gramian(tasks, dim, tasks + dim)
    scale = g.diagonal().max()
    hessian = g[1:, 1:] + 1e-9 * scale * np.eye(tasks - 1)
    b = tau * np.diag(g)[1:] - g[1:, 0]
    tol = 1e-10 * scale
    mu = _nonnegative_qp_support(hessian, b, tol)
    if dim < tasks and mu is None:  # near-singular H: the method may cycle; PCD then runs LH
        return
    assert mu is not None
    gradient = b - hessian @ mu
    assert mu.min() >= 0 and np.all(gradient <= tol)
    assert np.all(np.abs(gradient[mu > 0]) <= 1e-9 * scale)
    np.testing.assert_allclose(mu, _lawson_hanson(hessian, b, tol), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("shape", [(3, 4, 5), (400, 300, 300), (700, 700, 700)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_matmul_equals_numpy_below_and_above_the_torch_threshold(shape, dtype):
    rng = np.random.default_rng(0)
    n, k, m = shape
    a, b = rng.standard_normal((n, k)).astype(dtype), rng.standard_normal((k, m)).astype(dtype)
    expected = a @ b
    tol = 1e-12 if dtype == np.float64 else 1e-4
    np.testing.assert_allclose(matmul(a, b), expected, rtol=tol, atol=tol * np.sqrt(k))
    out = np.full((n, m), np.nan, dtype=dtype)
    assert matmul(a, b, out=out) is out
    np.testing.assert_allclose(out, expected, rtol=tol, atol=tol * np.sqrt(k))
    assert matmul(a, b).dtype == dtype


def test_matmul_takes_views_numpy_makes():
    """Transposed and reversed views (torch cannot share negative strides) give NumPy's result."""
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((400, 350)), rng.standard_normal((400, 350))
    for x, y in ((a, b.T), (a[::-1], b.T), (a, b[:, ::-1].T), (b.T[::-1], a)):
        np.testing.assert_allclose(matmul(x, y), x @ y, rtol=1e-12, atol=1e-9)
