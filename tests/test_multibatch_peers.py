"""MoDo and SDMGrad against torchjd 0.18, the one installed peer that implements them (LibMTL
1.1.5 has neither; its repository head has both, three-batch forms whose formulas
test_hooks_batches.py re-derives). The same draws go to both: torchjd gets ``J₁ J₂ᵀ`` from
Jacobians taken with its own ``torchjd.autojac.jac`` on a copy of the model, mtlopt gets the draws'
losses through ``step(closure)``; the task weights and the shared parameters' update agree to 1e-10
in float64, over three steps (the weights are kept between steps by both). The update is compared
under torchjd's conventions: MoDo's two-batch form steps along the mean of the two draws
(torchjd's first example), the three-batch forms along the third draw's Jacobian."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from conftest import SharedTrunkNet, losses_of, make_batch
from optional import require

import mtlopt

torchjd = require("torchjd")
from torchjd.aggregation import MoDoWeighting, SDMGradWeighting  # noqa: E402
from torchjd.autojac import jac  # noqa: E402

STEPS = 3


def _draw(model: SharedTrunkNet, seed: int) -> list[torch.Tensor]:
    x, y = make_batch(tasks=len(model.heads), seed=seed)
    return losses_of(model, x.double(), y.double())


def _trunk_jacobian(model: SharedTrunkNet, seed: int) -> torch.Tensor:
    """Rows: tasks, columns: the trunk's parameters, by torchjd's own Jacobian routine."""
    params = list(model.trunk.parameters())
    jacobians = jac(torch.stack(_draw(model, seed)), params)
    return torch.cat([j.flatten(1) for j in jacobians], dim=1)


def _trunk_grad(model: SharedTrunkNet) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.trunk.parameters()])


def _run_both(name: str, options: dict, weighting, batches: int, tasks: int) -> None:
    model = SharedTrunkNet(tasks=tasks).double()
    reference = copy.deepcopy(model)  # lr 0: both stay at the same point
    opt = mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), name, **options)
    seeds = itertools.count()

    def closure():
        return _draw(model, next(seeds))

    for step in range(STEPS):
        draws = [_trunk_jacobian(reference, s) for s in range(batches * step, batches * step + 3)]
        weights = weighting(draws[0] @ draws[1].T)
        along = draws[2] if batches == 3 else (draws[0] + draws[1]) / 2
        opt.zero_grad()
        info = opt.step(closure)
        torch.testing.assert_close(info.weights, weights, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(_trunk_grad(model), weights @ along, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tasks", [2, 4])
@pytest.mark.parametrize("batches", [3, 2])
def test_modo_equals_torchjd_modo_weighting(batches, tasks):
    """torchjd's defaults (γ = 0.1, ρ = 0.1) passed to ours (LibMTL's γ = 1e-3 is the default)."""
    _run_both(
        "modo", {"gamma": 0.1, "rho": 0.1, "batches": batches},
        MoDoWeighting(gamma=0.1, rho=0.1), batches, tasks,
    )  # fmt: skip


@pytest.mark.parametrize("tasks", [2, 4])
def test_sdmgrad_equals_torchjd_sdmgrad_weighting(tasks):
    """Both with their defaults (λ = 0.3, 20 inner steps, lr 10, momentum 0.5)."""
    _run_both("sdmgrad", {}, SDMGradWeighting(), 3, tasks)


def test_the_check_can_fail():
    """Another γ gives other weights: the comparison above is not vacuous."""
    with pytest.raises(AssertionError):
        _run_both("modo", {"gamma": 0.05, "rho": 0.1}, MoDoWeighting(gamma=0.1, rho=0.1), 3, 3)
