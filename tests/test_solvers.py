import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from mtlopt.solvers import min_norm_simplex, project_dual_cone


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
