"""The LibMTL adapter, both ways."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import SharedTrunkNet, losses_of, make_batch
from libmtl_oracle import build, build_with, flat_grad, libmtl_losses, requires_libmtl  # noqa: F401

import mtlopt
from mtlopt.interop.libmtl import from_libmtl, to_libmtl

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.usefixtures("requires_libmtl"),
]
_shared_grad = flat_grad


@pytest.mark.parametrize(
    "theirs, ours, kwargs, ours_kwargs",
    [
        ("PCGrad", "pcgrad", {}, {"seed": 0}),
        ("IMTL", "imtl_g", {}, {}),
        ("CAGrad", "cagrad", {"calpha": 0.5, "rescale": 1}, {"c": 0.5, "rescale": 1}),
        ("EW", "ew", {}, {}),
        ("GLS", "gls", {}, {}),
    ],
)
def test_libmtl_weighting_inside_mtloptimizer_matches_ours(theirs, ours, kwargs, ours_kwargs):
    tasks = 3 if theirs == "CAGrad" else 2
    net = SharedTrunkNet(tasks=tasks)
    twin = copy.deepcopy(net)
    x, y = make_batch(tasks=tasks)
    adapted = from_libmtl(theirs, num_tasks=tasks, **kwargs)
    opt = mtlopt.MTLOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), adapted)
    opt.backward(losses_of(net, x, y))
    reference = mtlopt.MTLOptimizer(torch.optim.SGD(twin.parameters(), lr=0.1), ours, **ours_kwargs)
    reference.backward(losses_of(twin, x, y))
    tolerance = {"rtol": 2e-3, "atol": 1e-5} if theirs == "CAGrad" else {"rtol": 1e-4, "atol": 1e-6}
    torch.testing.assert_close(_shared_grad(net.trunk), _shared_grad(twin.trunk), **tolerance)


def test_libmtl_uw_parameters_are_trained_through_the_adapter():
    net = SharedTrunkNet(tasks=2)
    x, y = make_batch()
    adapted = from_libmtl("UW", num_tasks=2)
    opt = mtlopt.MTLOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), adapted)
    (scale,) = adapted.parameters()
    before = scale.detach().clone()
    opt.zero_grad()
    opt.step(losses_of(net, x, y))
    assert not torch.equal(scale.detach(), before)


@pytest.mark.parametrize("ours, theirs", [("pcgrad", "PCGrad"), ("mgda", "MGDA"), ("ew", "EW")])
def test_mtlopt_strategy_inside_libmtl_matches_libmtl(ours, theirs):
    net = SharedTrunkNet(tasks=2)
    x, y = make_batch()
    kwargs = {"seed": 0} if ours == "pcgrad" else {}
    ours_model = build_with(to_libmtl(ours, **kwargs), net.trunk, net.heads)
    ours_model.zero_grad(set_to_none=False)
    ours_model.backward(libmtl_losses(ours_model, x, y))

    reference = build(theirs, net.trunk, net.heads)
    reference.zero_grad(set_to_none=False)
    reference.backward(libmtl_losses(reference, x, y), mgda_gn="none")
    torch.testing.assert_close(
        _shared_grad(ours_model.encoder), _shared_grad(reference.encoder), rtol=2e-3, atol=1e-5
    )


def test_new_method_runs_inside_libmtl():
    """Nash-MTL is not in LibMTL 1.1.5; through the adapter it runs on a LibMTL model."""
    net = SharedTrunkNet(tasks=3)
    x, y = make_batch(tasks=3)
    model = build_with(to_libmtl("nash_mtl"), net.trunk, net.heads)
    model.zero_grad(set_to_none=False)
    weights = model.backward(libmtl_losses(model, x, y))
    expected = mtlopt.MTLOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), "nash_mtl")
    expected.backward(losses_of(net, x, y))
    torch.testing.assert_close(
        _shared_grad(model.encoder), _shared_grad(net.trunk), rtol=1e-4, atol=1e-6
    )
    assert weights.shape == (3,) and (weights > 0).all()
