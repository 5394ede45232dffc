"""Loss strategies: each objective and its effective weights against the paper's formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import SharedTrunkNet, losses_of, make_batch

import mtlopt

LOSSES = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)


def _objective_and_autograd_weights(name, losses=LOSSES, **kwargs):
    strategy = mtlopt.create(name, num_tasks=len(losses), **kwargs)
    x = losses.clone().requires_grad_(True)
    result = strategy.scalarize(x)
    (grad,) = torch.autograd.grad(result.loss, x)
    return strategy, result, grad


@pytest.mark.parametrize("name", ["ew", "uw", "dwa", "rlw", "gls", "famo", "stch", "imtl_l"])
def test_reported_weights_are_the_derivatives_of_the_objective(name):
    _, result, grad = _objective_and_autograd_weights(name)
    torch.testing.assert_close(result.weights, grad)


def test_uw_objective():
    strategy, _, _ = _objective_and_autograd_weights("uw")
    with torch.no_grad():
        for p, value in zip(strategy.parameters(), [0.0, 1.0, -1.0], strict=True):
            p.fill_(value)
    s = torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64)
    value = strategy.scalarize(LOSSES).loss
    torch.testing.assert_close(value, (0.5 * torch.exp(-s) * LOSSES + 0.5 * s).sum())
    # The optimum of ½e^{-s}L + ½s in s is s = log L (Kendall et al.: σ² = L).
    log_vars = torch.zeros(3, requires_grad=True)
    opt = torch.optim.SGD([log_vars], lr=0.5)
    for _ in range(300):
        opt.zero_grad()
        (0.5 * torch.exp(-log_vars) * LOSSES.float() + 0.5 * log_vars).sum().backward()
        opt.step()
    np.testing.assert_allclose(log_vars.detach().numpy(), np.log(LOSSES.numpy()), atol=1e-3)


def test_gls_is_the_geometric_mean_and_rejects_non_positive_losses():
    _, result, _ = _objective_and_autograd_weights("gls")
    assert float(result.loss.detach()) == pytest.approx((0.5 * 2.0 * 1.0) ** (1 / 3))
    with pytest.raises(ValueError, match="positive"):
        mtlopt.create("gls").scalarize(torch.tensor([1.0, 0.0]))


def test_stch_is_a_smooth_maximum():
    strategy = mtlopt.create("stch", mu=0.01)
    assert float(strategy.scalarize(LOSSES).loss) == pytest.approx(2.0, abs=0.01)
    result = mtlopt.create("stch", mu=1.0, preference=[1, 2, 1], ideal=[0, 1, 0]).scalarize(LOSSES)
    expected = math.log(math.exp(0.5) + math.exp(2.0) + math.exp(1.0))
    assert float(result.loss) == pytest.approx(expected)


def test_rlw_weights_are_a_softmax_of_normals_and_reproducible():
    a = mtlopt.create("rlw", seed=1)
    b = mtlopt.create("rlw", seed=1)
    wa = [a.scalarize(LOSSES) for _ in range(3)]
    assert all(torch.equal(x.weights, wa[0].weights) for x in wa)  # no commit: same draw
    wa[0].commit()
    second = a.scalarize(LOSSES).weights
    assert not torch.equal(second, wa[0].weights)
    first_b = b.scalarize(LOSSES)
    torch.testing.assert_close(first_b.weights, wa[0].weights)
    assert float(second.sum()) == pytest.approx(1.0)


def test_dwa_weights_follow_the_loss_ratio():
    dwa = mtlopt.create("dwa", window=2, temperature=2.0)
    history = [[1.0, 1.0], [1.0, 1.0], [0.5, 1.0], [0.5, 1.0]]  # task 0 halves, task 1 stalls
    for losses in history:
        result = dwa.scalarize(torch.tensor(losses, dtype=torch.float64))
        assert torch.equal(result.weights, torch.ones(2, dtype=torch.float64))
        result.commit()
    weights = dwa.scalarize(torch.tensor([0.5, 1.0], dtype=torch.float64)).weights
    expected = 2 * torch.softmax(torch.tensor([0.5 / 2, 1.0 / 2], dtype=torch.float64), dim=0)
    torch.testing.assert_close(weights, expected)


def test_famo_update_moves_weight_to_the_task_that_improved_less():
    famo = mtlopt.create("famo", num_tasks=2, gamma=0.0)
    result = famo.scalarize(torch.tensor([1.0, 1.0], dtype=torch.float64))
    # The objective's weights are z_i / (c (L_i − b)): the normaliser makes Σ_i w_i (L_i − b) = 1.
    assert float((result.weights * torch.tensor([1.0, 1.0], dtype=torch.float64)).sum()) == (
        pytest.approx(1.0)
    )
    result.commit()
    famo.update(torch.tensor([0.5, 0.99], dtype=torch.float64))  # task 0 improved much more
    assert famo.task_weights[1] > famo.task_weights[0]
    with pytest.raises(ValueError, match="min_losses"):
        famo.scalarize(torch.tensor([-1.0, 1.0]))


def test_famo_with_a_closure_updates_after_each_step():
    model = SharedTrunkNet()
    x, y = make_batch()
    opt = mtlopt.MTLOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), "famo")
    for _ in range(5):
        opt.zero_grad()
        opt.step(lambda: losses_of(model, x, y))
    assert opt.strategy.logits is not None and (opt.strategy._adam.t == 5).all()
    with pytest.raises(TypeError, match="post-step"):
        mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "ew").update([1.0])


@pytest.mark.parametrize("name", ["uw", "imtl_l", "imtl"])
def test_learnable_strategy_parameters_join_the_optimizer_and_train(name):
    model = SharedTrunkNet()
    x, y = make_batch()
    opt = mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), name, num_tasks=2)
    params = opt.strategy.parameters()
    assert len(params) == 2
    assert opt.param_groups[-1]["params"] == params and opt.param_groups[-1]["weight_decay"] == 0
    before = opt.strategy.learned.clone()
    opt.zero_grad()
    opt.step(losses_of(model, x, y))
    assert not torch.equal(opt.strategy.learned, before)


def test_imtl_scales_learn_to_make_scaled_losses_one():
    """IMTL-L's s minimises e^s L − s, whose optimum is e^s L = 1."""
    imtl = mtlopt.create("imtl_l", num_tasks=2)
    opt = torch.optim.SGD(imtl.parameters(), lr=0.2)
    losses = torch.tensor([4.0, 0.25])
    for _ in range(500):
        opt.zero_grad()
        imtl.scalarize(losses).loss.backward()
        opt.step()
    torch.testing.assert_close(
        torch.exp(imtl.learned) * losses, torch.ones(2), atol=1e-3, rtol=0
    )


@pytest.mark.parametrize("name", ["ew", "dwa", "uw"])
def test_the_loss_path_writes_grad_only_into_the_optimizers_parameters(name, monkeypatch):
    """One backward of the objective writes ``.grad`` into the optimizer's parameters (and the
    strategy's own, UW's log-variances) only: a tensor the losses reach outside the optimizer (an input
    with ``requires_grad``, another module's weight) gets none. Where the graph reaches nothing
    else, the backward runs without ``inputs=`` (plain ``loss.backward()``, the cheaper call),
    decided once per set of tasks."""
    import mtlopt.paths.scalarized as scalarized

    calls = []
    backward = torch.autograd.backward

    def recording(tensors, *args, inputs=None, **kwargs):
        calls.append(inputs)
        return backward(tensors, *args, inputs=inputs, **kwargs)

    monkeypatch.setattr(scalarized.torch.autograd, "backward", recording)
    model = SharedTrunkNet()
    opt = mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), name)
    x, y = make_batch()
    for _ in range(2):
        opt.zero_grad()
        opt.step(losses_of(model, x, y))
    assert calls == [None, None]
    assert all(p.grad is not None for p in model.parameters())

    other = torch.nn.Linear(x.shape[1], x.shape[1])
    leaf = x.clone().requires_grad_(True)
    opt = mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), name)
    calls.clear()
    for _ in range(2):
        opt.zero_grad()
        opt.step(losses_of(model, other(leaf), y))
    assert all(inputs is not None for inputs in calls) and len(calls) == 2
    assert other.weight.grad is None and other.bias.grad is None and leaf.grad is None
    assert all(p.grad is not None for p in model.parameters())
