"""torchjd ⇄ mtlopt. torchjd's UPGrad and MGDA (its own solvers) against ours on random Jacobians to
solver tolerance; torchjd aggregators by name inside MTLOptimizer; ours inside torchjd's
``mtl_backward``."""

from __future__ import annotations

import pytest
import torch
from conftest import SharedTrunkNet, losses_of, make_batch
from optional import require

import mtlopt

aggregation = require("torchjd").aggregation
from mtlopt.interop.torchjd import from_torchjd, to_torchjd  # noqa: E402


def _jacobian(tasks: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tasks, 40, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("tasks", [2, 3, 5, 8])
@pytest.mark.parametrize("seed", range(3))
def test_torchjd_upgrad_equals_ours(tasks, seed):
    """Both solve the same dual-cone QPs (torchjd: quadprog; ours: an active-set solver) with the
    same trace-normalised ridge reg_eps=1e-4: equal to solver precision."""
    jacobian = _jacobian(tasks, seed)
    theirs = aggregation.UPGrad()(jacobian)
    torch.testing.assert_close(
        mtlopt.create("upgrad").aggregate(jacobian), theirs, rtol=1e-9, atol=1e-12
    )
    torch.testing.assert_close(from_torchjd("UPGrad").aggregate(jacobian), theirs)
    torch.testing.assert_close(to_torchjd("upgrad")(jacobian), theirs, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("tasks", [2, 3, 5])
@pytest.mark.parametrize("seed", range(3))
def test_torchjd_mgda_converged_equals_ours(tasks, seed):
    """torchjd's MGDA is Frank-Wolfe, stopped at epsilon=1e-3 by default (1 % apart from the
    minimum-norm point at T = 5); run to convergence it meets our exact minimum-norm solve."""
    jacobian = _jacobian(tasks, seed)
    theirs = aggregation.MGDA(epsilon=1e-14, max_iters=200_000)(jacobian)
    ours = mtlopt.create("mgda").aggregate(jacobian)
    assert float((ours - theirs).norm() / ours.norm()) < 1e-5


def test_torchjd_weighting_by_name_weighs_the_gramian():
    jacobian = _jacobian(4, 0)
    weights = aggregation.UPGradWeighting()(jacobian @ jacobian.T)
    torch.testing.assert_close(
        from_torchjd("UPGradWeighting").aggregate(jacobian), weights @ jacobian
    )


def test_a_torchjd_aggregator_trains_inside_mtloptimizer_by_name():
    torch.manual_seed(0)
    model = SharedTrunkNet()
    reference = SharedTrunkNet()
    reference.load_state_dict(model.state_dict())
    x, y = make_batch()
    opt = mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "torchjd:UPGrad")
    ours = mtlopt.MTLOptimizer(torch.optim.SGD(reference.parameters(), lr=0.1), "upgrad")
    for _ in range(3):
        opt.zero_grad()
        opt.step(losses_of(model, x, y))
        ours.zero_grad()
        ours.step(losses_of(reference, x, y))
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert opt.state_dict()["strategy_name"] == "torchjd:UPGrad"


def test_ours_as_a_torchjd_aggregator_in_mtl_backward():
    """torchjd's mtl_backward + jac_to_grad with our UPGrad as its aggregator writes the same trunk
    gradient as MTLOptimizer with UPGrad."""
    from torchjd.autojac import mtl_backward

    torch.manual_seed(0)
    model = SharedTrunkNet()
    x, y = make_batch()
    features = model.trunk(x)
    losses = [((h(features).squeeze(-1) - y[:, i]) ** 2).mean() for i, h in enumerate(model.heads)]
    aggregator = to_torchjd("upgrad")
    from torchjd.autojac import jac_to_grad

    mtl_backward(losses, features)
    jac_to_grad(list(model.trunk.parameters()), aggregator)
    theirs = [p.grad.clone() for p in model.trunk.parameters()]
    model.zero_grad()
    mtlopt.MTLOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), "upgrad", shared=model.trunk
    ).backward(losses_of(model, x, y))
    for g, p in zip(theirs, model.trunk.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)


def test_an_unknown_torchjd_name_lists_the_available_ones():
    with pytest.raises(KeyError, match="UPGrad"):
        mtlopt.create("torchjd:NoSuchThing")
