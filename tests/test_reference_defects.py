"""Defects found by running the authors' code side by side with mtlopt (issue 14).

Every expected value is derived from the paper's equation in the test's docstring, not read off
mtlopt or a reference implementation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from strategies_under_test import aggregate, gradient_strategies, random_jacobian

import mtlopt
from mtlopt.solvers import fair_weights


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_nash_mtl_update_has_norm_sqrt_t_before_clipping(scale):
    """Navon et al., Eq. 2: α_i (Gα)_i = 1 on the raw Gramian, so ‖Σ α_i g_i‖² = αᵀGα
    = Σ_i α_i (Gα)_i = T whatever the gradients' scale; max_norm = 1 then clips it to norm 1."""
    jacobian = scale * random_jacobian(3, 64, 0)
    free = mtlopt.create("nash_mtl", max_norm=None).combine(jacobian)
    gramian = jacobian @ jacobian.T
    alpha = free.weights
    torch.testing.assert_close(alpha * (gramian @ alpha), torch.ones(3, dtype=torch.float64))
    assert float(free.direction.norm()) == pytest.approx(3**0.5, rel=1e-9)
    clipped = mtlopt.create("nash_mtl").aggregate(jacobian)
    assert float(clipped.norm()) == pytest.approx(1.0, rel=1e-9)


def _spread_gramian(tasks: int, dim: int, spread: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    units = rng.standard_normal((tasks, dim))
    units /= np.linalg.norm(units, axis=1, keepdims=True)
    jacobian = np.logspace(0, np.log10(spread), tasks)[:, None] * units
    return jacobian @ jacobian.T


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("spread", [1e4, 1e5, 1e7])
def test_fair_weights_are_exact_when_gradient_norms_differ_by_orders_of_magnitude(alpha, spread):
    """Ban & Ji, Eq. 6 (Navon et al., Eq. 2 for α = 1): (G w)_i = w_i^(-1/α), checked as the
    relative residual w_i^(1/α) (G w)_i − 1, which any exact solution makes vanish to rounding."""
    for seed in range(3):
        gramian = _spread_gramian(6, 10, spread, seed)
        w = fair_weights(gramian, alpha)
        assert np.all(w > 0)
        residual = np.abs(w ** (1 / alpha) * (gramian @ w) - 1)
        assert residual.max() < 1e-9, residual


def test_cagrad_c_at_least_one_is_zero_where_the_tasks_leave_no_common_direction():
    """J = [[1,0],[−1,0.5],[−1,−0.5]] is Pareto stationary (½g1 + ¼g2 + ¼g3 = 0), so the primal
    max_d min_i g_i·d over ‖d − g_0‖ ≤ c‖g_0‖ (Liu et al., Eq. 4) is at most 0; c ≥ 1 puts d = 0 in
    the ball, and J d ≥ 0 forces d_1 ≥ 0 and d_1 ≤ −|d_2|/2: d = 0 is the only maximiser."""
    jacobian = torch.tensor([[1.0, 0.0], [-1.0, 0.5], [-1.0, -0.5]], dtype=torch.float64)
    for c in (1.0, 2.0, 5.0):
        for rescale in (0, 1):
            d = aggregate("cagrad", jacobian, c=c, rescale=rescale)
            torch.testing.assert_close(d, torch.zeros(2, dtype=torch.float64), atol=1e-9, rtol=0)


def test_cagrad_c_at_least_one_picks_the_maximiser_nearest_the_mean_gradient():
    """J = [[1,0],[−1,0],[0,1]] (g1 + g2 = 0): the maximisers of Eq. 4 are d = (0, t) with
    0 ≤ t ≤ 2/3 (d_1 = 0 from g1, g2; t ≥ 0 from g3; the ball of radius 1/3 around g_0 = (0, 1/3)).
    All conflict with no task; the one nearest g_0 is g_0 itself, which the dual's formula
    d = g_0 + c‖g_0‖ g_w/‖g_w‖ gives in the limit g_w → 0 taken along the mean (the authors' code
    adds 1e-8 to ‖g_w‖ and returns g_0 at g_w = 0)."""
    for dtype in (torch.float32, torch.float64):
        jacobian = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=dtype)
        d = aggregate("cagrad", jacobian, c=1.0, rescale=0)
        assert (jacobian @ d >= -1e-7).all(), jacobian @ d
        torch.testing.assert_close(d, torch.tensor([0.0, 1 / 3], dtype=dtype))


@pytest.mark.parametrize("name", ["imtl_g", "imtl"])
def test_imtl_g_is_permutation_invariant_on_dependent_gradients(name):
    """Eq. 12: d = Σ α_i g_i with d·u_i equal for all i and Σ α_i = 1 is G α = λ n (n_i = ‖g_i‖).
    For dependent gradients the least-squares (pseudo-inverse) solution α ∝ G⁺ n is the one that
    does not depend on the task order: G = [[1,2],[2,4]] = a aᵀ, G⁺ = G/25, G⁺ n = (1, 2)/5,
    α = (1/3, 2/3), d = (5/3, 0) for both orders."""
    jacobian = torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    expected = torch.tensor([5 / 3, 0.0], dtype=torch.float64)
    torch.testing.assert_close(aggregate(name, jacobian), expected)
    torch.testing.assert_close(aggregate(name, jacobian.flip(0)), expected)


ALIGNED_EXAMPLE = [
    [-0.0309036, -0.2424641, 0.5611067],
    [0.2254569, 0.1503826, -0.2543989],
    [0.0770445, -0.1886613, 0.4824720],
    [0.1657724, 0.1511452, -0.2832927],
]


def test_aligned_mtl_float32_agrees_with_float64_on_a_rank_deficient_jacobian():
    """Four tasks in three dimensions: G has rank 3 and a fourth eigenvalue that is rounding only
    (≈1e-17·λ_max in float64, up to 3e-8·λ_max in float32). Eq. 8 on the rank-3 system gives the
    same update in both precisions, to float32 accuracy."""
    wide = torch.tensor(ALIGNED_EXAMPLE, dtype=torch.float64)
    narrow = wide.float()
    expected = aggregate("aligned_mtl", wide)
    assert float(expected.norm()) == pytest.approx(0.131, abs=1e-3)
    torch.testing.assert_close(
        aggregate("aligned_mtl", narrow).double(), expected, atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("name", gradient_strategies())
def test_aggregate_treats_a_jacobian_that_requires_grad_as_data(name):
    """aggregate(J) detaches J: same result as for J.detach(), and no graph in the output."""
    jacobian = random_jacobian(3, 5, 7).requires_grad_(True)
    out = aggregate(name, jacobian)
    assert not out.requires_grad and out.grad_fn is None
    torch.testing.assert_close(out, aggregate(name, jacobian.detach()))


@pytest.mark.parametrize("beta_sigma, second_scale", [(None, 1 - 0.81 / 2**0.5), (0.0, 1 - 0.81)])
def test_db_mtl_ema_rate_decays_by_default(beta_sigma, second_scale):
    """Lin et al. (2023), Eqs. 3–5 with β_k = β/k^σ: J = diag(3, 1), L = (1, 2) gives log-loss
    gradients (3, 0) and (0, ½). Step 1 (β_1 = 0.9, EMA from zero): ĝ = 0.1·those, norms 0.3 and
    0.05, update ĝ_1 + 6 ĝ_2 = (0.3, 0.3). Step 2 on the same input: ĝ = (1 − 0.9 β_2)·the log
    gradients, update (1 − 0.9 β_2)·(3, 3), with β_2 = 0.9/√2 for the default σ = 0.5 and 0.9
    for LibMTL's constant rate (σ = 0)."""
    kwargs = {} if beta_sigma is None else {"beta_sigma": beta_sigma}
    strategy = mtlopt.create("db_mtl", **kwargs)
    jacobian = torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64))
    losses = torch.tensor([1.0, 2.0], dtype=torch.float64)
    first = strategy.aggregate(jacobian, losses)
    torch.testing.assert_close(first, torch.tensor([0.3, 0.3], dtype=torch.float64))
    second = strategy.aggregate(jacobian, losses)
    expected = second_scale * torch.tensor([3.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(second, expected)
