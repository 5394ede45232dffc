"""Hook 1, the multi-batch closure (MoDo, SDMGrad): the closure is called the documented number of
times, and the update matches the papers' equations computed here by hand from per-task gradients
taken with plain autograd."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from conftest import SharedTrunkNet, losses_of, make_batch

import mtlopt


def _simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto the simplex by bisection on the threshold (another algorithm than
    the library's sort-based one): Σ max(v − τ, 0) = 1."""
    low, high = v.min() - 1.0, v.max()
    for _ in range(200):
        tau = (low + high) / 2
        if np.maximum(v - tau, 0).sum() > 1:
            low = tau
        else:
            high = tau
    return np.maximum(v - (low + high) / 2, 0)


def _shared_jacobian(model: SharedTrunkNet, seed: int) -> torch.Tensor:
    x, y = make_batch(seed=seed)
    rows = []
    for loss in losses_of(model, x, y):
        grads = torch.autograd.grad(loss, list(model.trunk.parameters()), retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows).double()


def _counting_closure(model):
    seeds = itertools.count()
    calls = []

    def closure():
        seed = next(seeds)
        calls.append(seed)
        x, y = make_batch(seed=seed)
        return losses_of(model, x, y)

    return closure, calls


def _trunk_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.trunk.parameters()]).double()


@pytest.mark.parametrize("name", ["modo", "sdmgrad"])
@pytest.mark.parametrize("batches", [3, 2])
def test_the_closure_is_called_once_per_batch(name, batches):
    model = SharedTrunkNet()
    opt = mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), name, batches=batches)
    closure, calls = _counting_closure(model)
    for step in range(3):
        opt.zero_grad()
        opt.step(closure)
        assert len(calls) == batches * (step + 1)


@pytest.mark.parametrize("batches", [3, 2])
def test_modo_matches_the_papers_update(batches):
    """λ₁ = Π_Δ(λ₀ − γ(J₁J₂ᵀλ₀ + ρλ₀)), d = J₃ᵀ λ₁ (Chen et al., Algorithm 1), two steps; with two
    draws d = ((J₁ + J₂)/2)ᵀ λ₁ (torchjd's two-batch example; the official code sums)."""
    torch.manual_seed(0)
    model = SharedTrunkNet()
    reference = copy.deepcopy(model)
    gamma, rho = 0.5, 0.1  # a large γ, so that λ visibly moves
    opt = mtlopt.MTLOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), "modo", gamma=gamma, rho=rho, batches=batches
    )
    closure, _ = _counting_closure(model)
    lam = np.full(2, 0.5)
    for step in range(2):
        seeds = range(batches * step, batches * (step + 1))
        jacobians = [_shared_jacobian(reference, s) for s in seeds]
        first, second = jacobians[0].numpy(), jacobians[1].numpy()
        lam = _simplex(lam - gamma * (first @ second.T @ lam + rho * lam))
        opt.zero_grad()
        info = opt.step(closure)
        along = jacobians[2] if batches == 3 else (jacobians[0] + jacobians[1]) / 2
        expected = torch.from_numpy(lam) @ along
        torch.testing.assert_close(_trunk_grad(model), expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(info.weights.numpy(), lam, rtol=1e-6)
    # heads: the last draw's own gradient, unweighted
    x, y = make_batch(seed=batches * 2 - 1)
    head = torch.autograd.grad(losses_of(reference, x, y)[1], list(reference.heads[1].parameters()))
    for p, g in zip(model.heads[1].parameters(), head, strict=True):
        torch.testing.assert_close(p.grad, g)


def test_sdmgrad_matches_the_papers_update():
    """A = J_ξ J_ξ′ᵀ / (mean √A_ii)², 20 projected SGD steps (lr 10, momentum 0.5) on
    A(w + λ/T), d = J_ζᵀ(w + λ/T)/(1 + λ) (Xiao et al., Algorithm 1; LibMTL's inner loop), written
    here with torch.optim.SGD as the official code does."""
    torch.manual_seed(0)
    model = SharedTrunkNet()
    reference = copy.deepcopy(model)
    opt = mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), "sdmgrad")
    closure, _ = _counting_closure(model)
    lamda, w = 0.3, torch.full((2,), 0.5, dtype=torch.float64)
    for step in range(2):
        j1, j2, j3 = (_shared_jacobian(reference, s) for s in range(3 * step, 3 * step + 3))
        a = j1 @ j2.T
        a = a / (torch.sqrt(torch.diag(a).clamp_min(0)).mean() ** 2 + 1e-8)
        w = w.clone().requires_grad_(True)
        inner = torch.optim.SGD([w], lr=10, momentum=0.5)
        for _ in range(20):
            inner.zero_grad()
            w.grad = a @ (w.detach() + lamda / 2)
            inner.step()
            with torch.no_grad():
                w.copy_(torch.from_numpy(_simplex(w.detach().numpy())))
        w = w.detach()
        opt.zero_grad()
        opt.step(closure)
        expected = ((w + lamda / 2) / (1 + lamda)) @ j3
        torch.testing.assert_close(_trunk_grad(model), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["modo", "sdmgrad"])
def test_a_list_of_draws_equals_the_closure(name):
    torch.manual_seed(0)
    one = SharedTrunkNet()
    two = copy.deepcopy(one)
    opt_one = mtlopt.MTLOptimizer(torch.optim.SGD(one.parameters(), lr=0.1), name)
    opt_two = mtlopt.MTLOptimizer(torch.optim.SGD(two.parameters(), lr=0.1), name)
    closure, _ = _counting_closure(one)
    for step in range(2):
        opt_one.zero_grad()
        opt_one.step(closure)
        opt_two.zero_grad()
        opt_two.step([losses_of(two, *make_batch(seed=3 * step + k)) for k in range(3)])
    for p, q in zip(one.parameters(), two.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["modo", "sdmgrad"])
def test_a_step_without_the_draws_is_refused_and_changes_nothing(name):
    model = SharedTrunkNet()
    before = copy.deepcopy(model.state_dict())
    opt = mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), name)
    x, y = make_batch()
    with pytest.raises(TypeError, match="closure that draws a new batch at each call"):
        opt.step(losses_of(model, x, y))
    with pytest.raises(TypeError, match=r"called 3 times"):
        opt.backward(losses_of(model, x, y))
    with pytest.raises(TypeError, match="independent batches"):
        opt.step([losses_of(model, x, y)] * 2)  # two draws for a three-batch strategy
    assert opt.task_names is None
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_draw_missing_a_task_is_an_error_naming_it():
    model = SharedTrunkNet()
    opt = mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "modo")
    x, y = make_batch()
    full = dict(zip(("a", "b"), losses_of(model, x, y), strict=True))
    partial = {"a": losses_of(model, x, y)[0], "b": None}
    with pytest.raises(ValueError, match="draw 1 of the step has no loss for task"):
        opt.step([partial, full, dict(zip(("a", "b"), losses_of(model, x, y), strict=True))])
    assert all(p.grad is None for p in model.parameters())


def test_modo_state_is_saved_and_restored():
    model = SharedTrunkNet()
    opt = mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "modo", gamma=0.5)
    closure, _ = _counting_closure(model)
    opt.step(closure)
    saved = opt.state_dict()
    fresh = mtlopt.MTLOptimizer(torch.optim.SGD(SharedTrunkNet().parameters(), lr=0.1), "modo")
    fresh.load_state_dict(saved)
    np.testing.assert_array_equal(fresh.strategy.weights, opt.strategy.weights)
    assert not np.allclose(opt.strategy.weights, 0.5)


def test_modo_keeps_an_absent_tasks_weight():
    model = SharedTrunkNet(tasks=3)
    opt = mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "modo", gamma=0.5)

    def draw(seed):
        a, _, c = losses_of(model, *make_batch(tasks=3, seed=seed))
        return {"a": a, "b": None, "c": c}

    opt.step([draw(0), draw(1), draw(2)])
    weights = opt.strategy.weights
    assert np.isnan(weights[1]) and abs(weights[0] + weights[2] - 1) < 1e-12
