"""The switches that reproduce the authors' conventions where mtlopt follows the paper instead
(issue 14); each expected value is derived by hand in the test's docstring."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from strategies_under_test import aggregate, random_jacobian

import mtlopt
from mtlopt.strategies.pcgrad import project_conflicting


@pytest.mark.parametrize("name, kwargs", [("cagrad", {"c": 0.5}), ("fairgrad", {})])
def test_times_tasks_and_max_norm_reproduce_the_authors_scaling(name, kwargs):
    """The authors multiply the update by T (times_tasks) and FairGrad's code, like the FAMO
    repository's CAGrad, then clips it to norm 1 (max_norm)."""
    jacobian = random_jacobian(3, 6, 2)
    plain = aggregate(name, jacobian, **kwargs)
    torch.testing.assert_close(aggregate(name, jacobian, times_tasks=True, **kwargs), 3 * plain)
    clipped = aggregate(name, jacobian, times_tasks=True, max_norm=1.0, **kwargs)
    torch.testing.assert_close(clipped, plain / plain.norm())
    loose = aggregate(name, jacobian, max_norm=10 * float(plain.norm()), **kwargs)
    torch.testing.assert_close(loose, plain)
    with pytest.raises(ValueError, match="max_norm"):
        mtlopt.create(name, max_norm=0.0)


SELF_EXAMPLE = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [-3.0, -1.0]], dtype=torch.float64)


def test_pcgrad_projection_off_a_tasks_own_gradient():
    """g1 = (1, 0) visits g2 = (−1, 1): g1·g2 = −1, g1' = g1 + ½ g2 = (½, ½); then g3 = (−3, −1):
    g1'·g3 = −2, g1'' = g1' + 0.2 g3 = (−0.1, 0.3), which conflicts with g1 itself
    (g1''·g1 = −0.1): visiting g1 last projects it to (0, 0.3)."""
    gramian = (SELF_EXAMPLE @ SELF_EXAMPLE.T).numpy()
    empty = np.array([], dtype=int)
    without = project_conflicting(gramian, [np.array([1, 2]), empty, empty])
    with_self = project_conflicting(gramian, [np.array([1, 2, 0]), empty, empty])
    np.testing.assert_allclose(without[0] @ SELF_EXAMPLE.numpy(), [-0.1, 0.3], atol=1e-12)
    np.testing.assert_allclose(with_self[0] @ SELF_EXAMPLE.numpy(), [0.0, 0.3], atol=1e-12)


def _sequential(gramian: np.ndarray, orders) -> np.ndarray:
    coefficients = np.eye(len(gramian))
    for i, order in enumerate(orders):
        for j in order:
            dot = coefficients[i] @ gramian[:, j]
            if dot < 0:
                coefficients[i, j] -= dot / gramian[j, j]
    return coefficients.sum(axis=0)


@pytest.mark.parametrize("self_projection", [False, True])
def test_pcgrad_self_projection_visits_each_task_itself_in_a_random_place(self_projection):
    """Every output of PCGrad is Algorithm 1 for some visiting orders: over the others only by
    default, over all tasks (the task's own original gradient included) with self_projection.
    Visiting oneself first changes nothing, so the default's outputs are all reachable with the
    option; on SELF_EXAMPLE the option also reaches outputs the default cannot."""
    gramian = (SELF_EXAMPLE @ SELF_EXAMPLE.T).numpy()
    tasks = range(3)

    def candidates(with_self: bool) -> list[np.ndarray]:
        per_task = [
            list(itertools.permutations([j for j in tasks if with_self or j != i])) for i in tasks
        ]
        return [_sequential(gramian, orders) for orders in itertools.product(*per_task)]

    reachable, other = candidates(self_projection), candidates(not self_projection)
    seen = set()
    for seed in range(40):
        weights = mtlopt.create("pcgrad", seed=seed, self_projection=self_projection)
        w = weights.combine(SELF_EXAMPLE).weights.numpy()
        matches = [k for k, c in enumerate(reachable) if np.allclose(w, c, atol=1e-12)]
        assert matches, w
        seen.add(tuple(np.round(w, 9)))
    if self_projection:
        exclusive = {tuple(np.round(c, 9)) for c in reachable} - {
            tuple(np.round(c, 9)) for c in other
        }
        assert seen & exclusive, "the option never reached an output the default cannot"


def test_graddrop_keep_gradnorm_constant_rescales_to_the_norm_of_the_sum():
    """The authors' default: the masked sum is rescaled to ‖Σ_i g_i‖ (direction unchanged)."""
    jacobian = random_jacobian(4, 30, 5)
    plain = aggregate("graddrop", jacobian, seed=1)
    kept = aggregate("graddrop", jacobian, seed=1, keep_gradnorm_constant=True)
    torch.testing.assert_close(kept, plain * jacobian.sum(0).norm() / plain.norm())


@pytest.mark.parametrize(
    "scale_mode, sigma", [("min", 1.0), ("median", 2.0), ("lower_median", 1.0), ("rmse", 5**0.5)]
)
def test_aligned_mtl_scale_modes_on_two_singular_values(scale_mode, sigma):
    """J = diag(1, 3): singular values 1 and 3, V = I; Eq. 8 gives weights (σ/T)(1/1, 1/3) and
    update (σ/2)(1, 1). The median of (1, 3) is 2 (numpy, mean of the two middle values), its
    lower middle value 1 (torch.median); rmse √((1 + 9)/2) = √5."""
    jacobian = torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64))
    expected = torch.full((2,), sigma / 2, dtype=torch.float64)
    torch.testing.assert_close(aggregate("aligned_mtl", jacobian, scale_mode=scale_mode), expected)


@pytest.mark.parametrize("name", ["mgda", "nash_mtl"])
def test_weighted_heads_scale_each_head_by_its_task_weight_as_the_authors_code(name):
    """The authors back-propagate Σ α_i L_i: head i's gradient is α_i ∇L_i (Nash-MTL's α before
    the clipping that their code applies to the shared parameters only); the trunk is unchanged."""
    import copy

    from conftest import SharedTrunkNet, make_batch

    torch.manual_seed(0)
    model = SharedTrunkNet(tasks=3)
    x, y = make_batch(tasks=3)
    reference = copy.deepcopy(model)
    losses = [((p - y[:, i]) ** 2).mean() * (i + 1) for i, p in enumerate(reference(x))]
    trunk = list(reference.trunk.parameters())
    jacobian = torch.stack(
        [torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, trunk, retain_graph=True)])
         for loss in losses]
    )
    gramian = (jacobian @ jacobian.T).double().numpy()
    if name == "mgda":
        alpha = mtlopt.create("mgda").combine(jacobian).weights
    else:
        from mtlopt.solvers import fair_weights

        alpha = torch.from_numpy(fair_weights(gramian)).float()
    heads = [torch.autograd.grad(loss, list(h.parameters()), retain_graph=True)
             for loss, h in zip(losses, reference.heads, strict=True)]
    for weighted in (False, True):
        net = copy.deepcopy(model)
        opt = mtlopt.MTLOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), name,
                                  weighted_heads=weighted)
        opt.backward([((p - y[:, i]) ** 2).mean() * (i + 1) for i, p in enumerate(net(x))])
        for i, (head, grads) in enumerate(zip(net.heads, heads, strict=True)):
            factor = float(alpha[i]) if weighted else 1.0
            for p, g in zip(head.parameters(), grads, strict=True):
                torch.testing.assert_close(p.grad, g * factor, rtol=1e-5, atol=1e-7)
        trunk_grad = torch.cat([p.grad.reshape(-1) for p in net.trunk.parameters()])
        if not weighted:
            expected_trunk = trunk_grad
        torch.testing.assert_close(trunk_grad, expected_trunk)


def test_dwa_per_epoch_keeps_the_weights_of_the_last_two_complete_windows():
    """MTAN's DWA (Liu et al., 2019, Eq. 1) per epoch: w(t) from L̄(t−1)/L̄(t−2), fixed during
    epoch t. With window = 2 steps per epoch: epochs 1, 2 (weights 1), then renewed every 2 steps."""
    dwa = mtlopt.create("dwa", window=2, per_epoch=True, temperature=2.0)
    losses = [[4.0, 4.0], [4.0, 4.0], [2.0, 4.0], [2.0, 4.0], [1.0, 4.0], [1.0, 4.0], [1.0, 1.0]]
    weights = []
    for step in losses:
        result = dwa.scalarize(torch.tensor(step, dtype=torch.float64))
        weights.append(result.weights.numpy())
        result.commit()

    def expected(r):
        e = np.exp(np.asarray(r) / 2.0)
        return 2 * e / e.sum()

    for w in weights[:4]:
        np.testing.assert_allclose(w, [1.0, 1.0])
    np.testing.assert_allclose(weights[4], expected([2 / 4, 4 / 4]))  # epochs 2 and 1
    np.testing.assert_allclose(weights[5], weights[4])  # fixed within epoch 3
    np.testing.assert_allclose(weights[6], expected([1 / 2, 4 / 4]))  # epochs 3 and 2
