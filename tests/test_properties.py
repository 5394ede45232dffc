"""Properties every gradient strategy must have, on random matrices drawn by hypothesis."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies_under_test import aggregate, gradient_strategies, random_jacobian

SETTINGS = settings(max_examples=40, deadline=None)
shapes = st.tuples(st.integers(1, 12), st.integers(1, 24), st.integers(0, 2**31 - 1))


@pytest.mark.parametrize("name", gradient_strategies())
@SETTINGS
@given(shape=shapes, scale=st.sampled_from([1e-12, 1e-6, 1.0, 1e6, 1e12]))
def test_output_is_finite_with_the_right_shape(name, shape, scale):
    tasks, dim, seed = shape
    for dtype in (torch.float32, torch.float64):
        out = aggregate(name, random_jacobian(tasks, dim, seed, scale, dtype))
        assert out.shape == (dim,) and out.dtype == dtype
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", gradient_strategies())
@pytest.mark.parametrize("case", ["zero", "identical", "opposite", "one_zero_row", "single_task"])
def test_degenerate_matrices_give_finite_updates(name, case):
    g = torch.tensor([3.0, -1.0, 2.0])
    jacobian = {
        "zero": torch.zeros(3, 3),
        "identical": g.repeat(4, 1),
        "opposite": torch.stack([g, -g]),
        "one_zero_row": torch.stack([g, torch.zeros(3), 2 * g]),
        "single_task": g[None],
    }[case]
    out = aggregate(name, jacobian)
    assert torch.isfinite(out).all()
    if case == "zero":
        assert torch.equal(out, torch.zeros(3))


@pytest.mark.parametrize("name", ["mgda", "cagrad", "ew", "gradnorm"])
@SETTINGS
@given(shape=shapes, data=st.data())
def test_permutation_invariance(name, shape, data):
    tasks, dim, seed = shape
    jacobian = random_jacobian(tasks, dim, seed)
    permutation = data.draw(st.permutations(range(tasks)))
    out = aggregate(name, jacobian)
    permuted = aggregate(name, jacobian[list(permutation)])
    torch.testing.assert_close(out, permuted, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["mgda", "cagrad", "ew", "pcgrad"])
@SETTINGS
@given(shape=shapes, factor=st.sampled_from([1e-3, 0.5, 3.0, 1e4]))
def test_positive_homogeneity(name, shape, factor):
    tasks, dim, seed = shape
    jacobian = random_jacobian(tasks, dim, seed)
    torch.testing.assert_close(
        aggregate(name, factor * jacobian),
        factor * aggregate(name, jacobian),
        rtol=1e-5,
        atol=1e-9 * factor,
    )


@SETTINGS
@given(shape=shapes)
def test_mgda_is_a_common_descent_direction(shape):
    """The min-norm point d of the convex hull satisfies d·g_i ≥ ‖d‖² for every task."""
    tasks, dim, seed = shape
    jacobian = random_jacobian(tasks, dim, seed)
    d = aggregate("mgda", jacobian)
    inner = jacobian @ d
    assert (inner >= (d @ d) - 1e-9 * (1 + jacobian.abs().max() ** 2)).all()


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), dim=st.integers(1, 24))
def test_pcgrad_two_tasks_never_conflicts_with_either_task(seed, dim):
    jacobian = random_jacobian(2, dim, seed)
    d = aggregate("pcgrad", jacobian)
    assert (jacobian @ d >= -1e-10).all()


@SETTINGS
@given(shape=shapes)
def test_pcgrad_leaves_non_conflicting_gradients_alone(shape):
    tasks, dim, seed = shape
    jacobian = random_jacobian(tasks, dim, seed).abs()  # all pairwise inner products ≥ 0
    torch.testing.assert_close(aggregate("pcgrad", jacobian), jacobian.sum(0))
    torch.testing.assert_close(aggregate("pcgrad", jacobian, reduction="mean"), jacobian.mean(0))


@SETTINGS
@given(shape=shapes, c=st.sampled_from([0.1, 0.4, 0.9]))
def test_cagrad_solves_its_primal_problem(shape, c):
    """d maximises min_i g_i·d over the ball ‖d − g_0‖ ≤ c‖g_0‖ (Liu et al. 2021, Eq. 4)."""
    tasks, dim, seed = shape
    jacobian = random_jacobian(tasks, dim, seed)
    d = aggregate("cagrad", jacobian, c=c, rescale=0)
    g0 = jacobian.mean(0)
    radius = c * g0.norm()
    assert (d - g0).norm() <= radius * (1 + 1e-6) + 1e-9
    rng = np.random.default_rng(seed)
    directions = torch.from_numpy(rng.standard_normal((256, dim)))
    directions = directions / directions.norm(dim=1, keepdim=True)
    candidates = g0 + radius * directions * torch.from_numpy(rng.uniform(0, 1, (256, 1)))
    best_random = (candidates @ jacobian.T).min(dim=1).values.max()
    assert (jacobian @ d).min() >= best_random - 1e-6 * (1 + g0.norm() ** 2)


def test_cagrad_with_c_zero_is_the_mean():
    jacobian = random_jacobian(5, 7, 3)
    torch.testing.assert_close(aggregate("cagrad", jacobian, c=0.0), jacobian.mean(0))


@pytest.mark.parametrize("rescale, divisor", [(0, 1.0), (1, 1.25), (2, 1.5)])
def test_cagrad_rescale_conventions(rescale, divisor):
    jacobian = random_jacobian(3, 5, 1)
    plain = aggregate("cagrad", jacobian, c=0.5, rescale=0)
    torch.testing.assert_close(
        aggregate("cagrad", jacobian, c=0.5, rescale=rescale), plain / divisor
    )
