"""Properties every gradient strategy must have, on random matrices drawn by hypothesis."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies_under_test import aggregate, gradient_strategies, random_jacobian

import mtlopt

SETTINGS = settings(max_examples=40, deadline=None)
shapes = st.tuples(st.integers(1, 40), st.integers(1, 48), st.integers(0, 2**31 - 1))
small_shapes = st.tuples(st.integers(1, 10), st.integers(1, 24), st.integers(0, 2**31 - 1))


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
@pytest.mark.parametrize(
    "case", ["zero", "identical", "collinear", "opposite", "one_zero_row", "single_task"]
)
def test_degenerate_matrices_give_finite_updates(name, case):
    g = torch.tensor([3.0, -1.0, 2.0])
    jacobian = {
        "zero": torch.zeros(3, 3),
        "identical": g.repeat(4, 1),
        "collinear": torch.stack([g, 3 * g, 0.5 * g]),
        "opposite": torch.stack([g, -g]),
        "one_zero_row": torch.stack([g, torch.zeros(3), 2 * g]),
        "single_task": g[None],
    }[case]
    out = aggregate(name, jacobian)
    assert torch.isfinite(out).all()
    if case == "zero":
        assert torch.equal(out, torch.zeros(3))


@pytest.mark.parametrize(
    "name",
    [
        "mgda",
        "cagrad",
        "ew",
        "gradnorm",
        "imtl_g",
        "upgrad",
        "dualproj",
        "fairgrad",
        "nash_mtl",
        "config",
        "aligned_mtl",
        "db_mtl",
    ],
)
@SETTINGS
@given(shape=small_shapes, data=st.data())
def test_permutation_invariance(name, shape, data):
    tasks, dim, seed = shape
    jacobian = random_jacobian(tasks, dim, seed)
    permutation = data.draw(st.permutations(range(tasks)))
    out = aggregate(name, jacobian)
    permuted = aggregate(name, jacobian[list(permutation)])
    # Dependent gradients (T > P) with 0 in their convex hull: the fairness equations of FairGrad
    # / Nash-MTL have no solution; the solver's fallback ridge decides the weights and the
    # (near-zero) result agrees across orderings to 1e-6 of the gradients' scale, not relatively.
    ill_conditioned = tasks > dim and name in ("fairgrad", "nash_mtl")
    rtol = 1e-4 if ill_conditioned else 1e-6
    atol = 1e-6 * float(jacobian.norm(dim=1).max()) if ill_conditioned else 1e-8
    if name == "cagrad":  # an iterative (L-BFGS-B) solve of its dual: agreement to its tolerance
        rtol, atol = 1e-5, 1e-7 * float(jacobian.norm(dim=1).max())
    torch.testing.assert_close(out, permuted, rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "name",
    [
        "mgda",
        "cagrad",
        "ew",
        "pcgrad",
        "gradvac",
        "imtl_g",
        "upgrad",
        "dualproj",
        "aligned_mtl",
        "config",
    ],
)
@SETTINGS
@given(shape=small_shapes, factor=st.sampled_from([1e-3, 0.5, 3.0, 1e4]))
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


def _conflict_free(jacobian, d):
    return (jacobian @ d >= -1e-7 * (1 + jacobian.norm(dim=1) * d.norm())).all()


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
@SETTINGS
@given(shape=small_shapes)
def test_dual_cone_projections_conflict_with_no_task(name, shape):
    tasks, dim, seed = shape
    jacobian = random_jacobian(tasks, dim, seed)
    assert _conflict_free(jacobian, aggregate(name, jacobian, reg_eps=0.0))


@SETTINGS
@given(shape=small_shapes)
def test_imtl_g_and_config_have_equal_projections_on_unit_gradients(shape):
    """IMTL-G (Eq. 12) and ConFIG (Eq. 2) both give d·u_i equal for all tasks (full row rank J)."""
    tasks, dim, seed = shape
    if tasks > dim:
        return
    jacobian = random_jacobian(tasks, dim, seed)
    units = jacobian / jacobian.norm(dim=1, keepdim=True)
    for name in ("imtl_g", "config"):
        projections = units @ aggregate(name, jacobian)
        torch.testing.assert_close(
            projections, projections.mean().expand(tasks), rtol=1e-6, atol=1e-8
        )
    assert (units @ aggregate("config", jacobian) > 0).all()


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
@SETTINGS
@given(shape=small_shapes)
def test_fairgrad_solves_the_fairness_equation(alpha, shape):
    """G w = w^(-1/α) with w > 0 (Ban & Ji, Eq. 6) for a full-rank Gramian."""
    tasks, dim, seed = shape
    if tasks > dim:
        return
    jacobian = random_jacobian(tasks, dim, seed)
    weights = mtlopt.create("fairgrad", alpha=alpha).combine(jacobian).weights
    gramian = jacobian @ jacobian.T
    assert (weights > 0).all()
    # No ridge on a solvable system: exact to rounding (cond(G) amplifies it).
    torch.testing.assert_close(gramian @ weights, weights ** (-1 / alpha), rtol=1e-8, atol=1e-12)


@SETTINGS
@given(shape=small_shapes)
def test_nash_mtl_solves_the_bargaining_condition(shape):
    """α_i (G α)_i = 1 on the raw Gramian (Navon et al., Eq. 2; the authors' Frobenius
    normalisation cancels in their constraint)."""
    tasks, dim, seed = shape
    if tasks > dim:
        return
    jacobian = random_jacobian(tasks, dim, seed)
    alpha = mtlopt.create("nash_mtl", max_norm=None).combine(jacobian).weights
    gramian = jacobian @ jacobian.T
    torch.testing.assert_close(alpha * (gramian @ alpha), torch.ones_like(alpha), rtol=0, atol=1e-8)
    clipped = mtlopt.create("nash_mtl", max_norm=0.5).aggregate(jacobian)
    assert clipped.norm() <= 0.5 + 1e-9


@SETTINGS
@given(shape=small_shapes)
def test_aligned_mtl_equalises_singular_values(shape):
    """The aligned system σ V Λ^{-1/2} Vᵀ J has all singular values equal to σ (Eq. 8)."""
    tasks, dim, seed = shape
    if tasks > dim:
        return
    jacobian = random_jacobian(tasks, dim, seed)
    lam, v = torch.linalg.eigh(jacobian @ jacobian.T)
    aligned = lam.min().sqrt() * v @ torch.diag(lam.rsqrt()) @ v.T @ jacobian
    singular = torch.linalg.svdvals(aligned)
    torch.testing.assert_close(singular, lam.min().sqrt().expand(tasks), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(aggregate("aligned_mtl", jacobian, reduction="sum"), aligned.sum(0))


@SETTINGS
@given(shape=small_shapes, data=st.data())
def test_gradvac_raises_each_cosine_to_its_target(shape, data):
    """Wang et al., Eq. 5: when cos(g_i', g_j) < φ̂_ij the adjusted cosine equals φ̂_ij exactly."""
    from mtlopt.strategies.gradvac import vaccinate

    tasks, dim, seed = shape
    if tasks < 2 or dim < 2:  # in one dimension a cosine is ±1 and no target can be reached
        return
    jacobian = random_jacobian(tasks, dim, seed)
    gramian = (jacobian @ jacobian.T).numpy()
    target = data.draw(st.floats(-0.9, 0.9))
    i, j = 0, 1
    orders = [np.array([k for k in range(tasks) if k != r]) for r in range(tasks)]
    orders[i] = np.array([j])  # task 0 visits only task 1
    coefficients, new_targets = vaccinate(gramian, np.full((tasks, tasks), target), orders, 0.25)
    adjusted = torch.from_numpy(coefficients[i]) @ jacobian
    cosine = float(torch.nn.functional.cosine_similarity(adjusted, jacobian[j], dim=0))
    original = float(torch.nn.functional.cosine_similarity(jacobian[i], jacobian[j], dim=0))
    assert cosine == pytest.approx(max(original, target), abs=1e-7)
    assert new_targets[i, j] == pytest.approx(0.75 * target + 0.25 * original)


def test_gradvac_first_step_is_pcgrad():
    """Targets start at 0, so the first step projects exactly the conflicting pairs."""
    jacobian = random_jacobian(6, 9, 4)
    torch.testing.assert_close(
        aggregate("gradvac", jacobian, seed=3), aggregate("pcgrad", jacobian, seed=3)
    )


@SETTINGS
@given(shape=small_shapes)
def test_graddrop_keeps_one_sign_per_coordinate(shape):
    tasks, dim, seed = shape
    jacobian = random_jacobian(tasks, dim, seed)
    out = aggregate("graddrop", jacobian)
    positive = jacobian.clamp_min(0).sum(0)
    negative = jacobian.clamp_max(0).sum(0)
    # Each coordinate keeps either all positive or all negative components (leak = 0).
    assert torch.all(torch.isclose(out, positive) | torch.isclose(out, negative))


def _pcgrad_one_pair_at_a_time(gramian, orders):
    """Yu et al. (2020), Algorithm 1, one task and one pair at a time, on coefficients."""
    coefficients = np.eye(len(gramian))
    for i, order in enumerate(orders):
        for j in order:
            dot = coefficients[i] @ gramian[:, j]
            if dot < 0 and gramian[j, j] > 0:
                coefficients[i, j] -= dot / gramian[j, j]
    return coefficients


def _gradvac_one_pair_at_a_time(gramian, targets, orders, beta):
    """Wang et al. (2021), Algorithm 1, one task and one pair at a time, on coefficients."""
    targets = targets.copy()
    coefficients = np.eye(len(gramian))
    for i, order in enumerate(orders):
        c = coefficients[i]
        for j in order:
            norm_i, norm_j = np.sqrt(max(c @ gramian @ c, 0.0)), np.sqrt(gramian[j, j])
            if norm_i == 0 or norm_j == 0:
                continue
            phi = np.clip(c @ gramian[:, j] / (norm_i * norm_j), -1, 1)
            target = targets[i, j]
            if phi < target:
                c[j] += (
                    norm_i
                    * (target * np.sqrt(1 - phi**2) - phi * np.sqrt(1 - target**2))
                    / (norm_j * np.sqrt(max(1 - target**2, 1e-12)))
                )
            targets[i, j] = (1 - beta) * target + beta * phi
    return coefficients, targets


@SETTINGS
@given(shape=small_shapes, data=st.data())
def test_pcgrad_and_gradvac_rounds_equal_one_pair_at_a_time(shape, data):
    """The vectorised passes (all tasks advance together) equal the papers' sequential loops, with
    zero gradients and sequences of any length (a task may visit only some of the others)."""
    from mtlopt.strategies.gradvac import vaccinate
    from mtlopt.strategies.pcgrad import project_conflicting

    tasks, dim, seed = shape
    jacobian = random_jacobian(tasks, dim, seed).double()
    jacobian[data.draw(st.integers(0, tasks - 1))] = 0.0
    gramian = (jacobian @ jacobian.T).numpy()
    rng = np.random.default_rng(seed)
    orders = [
        rng.permutation(np.delete(np.arange(tasks), i))[: data.draw(st.integers(0, tasks - 1))]
        for i in range(tasks)
    ]
    targets = rng.uniform(-0.5, 0.5, (tasks, tasks))
    np.testing.assert_allclose(
        project_conflicting(gramian, orders),
        _pcgrad_one_pair_at_a_time(gramian, orders),
        rtol=1e-9,
        atol=1e-12,
    )
    if dim < 2:  # GradVac in one dimension: every cosine is ±1 and a step cancels g_i' to ~0
        return
    coefficients, new_targets = vaccinate(gramian, targets, orders, 0.3)
    expected_coefficients, expected_targets = _gradvac_one_pair_at_a_time(
        gramian, targets, orders, 0.3
    )
    # √(1 − φ²) amplifies rounding near |φ| = 1 (the norms are updated, not recomputed): an error
    # of 1e-16 in φ becomes ~1e-8 in a coefficient.
    np.testing.assert_allclose(coefficients, expected_coefficients, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(new_targets, expected_targets, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(("tasks", "block"), [(40, 5), (40, 7), (90, None)])
def test_pcgrad_and_gradvac_blocks_equal_one_pair_at_a_time(tasks, block):
    """Many tasks, the rounds run in blocks (block boundaries crossed many times), sequences of
    uneven length, some visiting the task itself (PCGrad's self_projection): the blocked passes
    equal the papers' sequential loops."""
    from mtlopt.strategies.gradvac import vaccinate
    from mtlopt.strategies.pcgrad import project_conflicting

    rng = np.random.default_rng(tasks)
    jacobian = rng.standard_normal((tasks, 2 * tasks))
    gramian = jacobian @ jacobian.T
    orders = [rng.permutation(tasks)[: rng.integers(tasks // 2, tasks + 1)] for _ in range(tasks)]
    np.testing.assert_allclose(
        project_conflicting(gramian, orders, block),
        _pcgrad_one_pair_at_a_time(gramian, orders),
        rtol=1e-9,
        atol=1e-12,
    )
    if tasks > 40:  # the sequential GradVac reference is O(T⁴)
        return
    others = [order[order != i] for i, order in enumerate(orders)]
    targets = rng.uniform(-0.5, 0.5, (tasks, tasks))
    coefficients, new_targets = vaccinate(gramian, targets, others, 0.3, block)
    expected_coefficients, expected_targets = _gradvac_one_pair_at_a_time(
        gramian, targets, others, 0.3
    )
    np.testing.assert_allclose(coefficients, expected_coefficients, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(new_targets, expected_targets, rtol=1e-8, atol=1e-10)
