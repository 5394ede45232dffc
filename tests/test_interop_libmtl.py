"""The LibMTL adapter, both ways."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import SharedTrunkNet, losses_of, make_batch
from libmtl_oracle import build, libmtl, libmtl_losses

import mtlopt
from mtlopt.interop.libmtl import from_libmtl, to_libmtl

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def _needs_libmtl():
    libmtl()


def _shared_grad(module):
    return torch.cat([p.grad.reshape(-1) for p in module.parameters()])


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
    model = build("EW", net.trunk, net.heads)  # architecture only; weighting replaced below
    lib = libmtl()

    class Ours(lib.architecture.HPS, to_libmtl(ours, **kwargs)):
        pass

    ours_model = Ours(
        task_name=["t0", "t1"],
        encoder_class=lambda: copy.deepcopy(net.trunk),
        decoders=torch.nn.ModuleDict({f"t{i}": copy.deepcopy(h) for i, h in enumerate(net.heads)}),
        rep_grad=False,
        multi_input=False,
        device=torch.device("cpu"),
    )
    ours_model.init_param()
    ours_model.zero_grad(set_to_none=False)
    ours_model.backward(libmtl_losses(ours_model, x, y))

    reference = build(theirs, net.trunk, net.heads)
    reference.zero_grad(set_to_none=False)
    reference.backward(libmtl_losses(reference, x, y), mgda_gn="none")
    del model
    torch.testing.assert_close(
        _shared_grad(ours_model.encoder), _shared_grad(reference.encoder), rtol=2e-3, atol=1e-5
    )


def test_new_method_runs_inside_libmtl():
    """Nash-MTL is not in LibMTL 1.1.5; through the adapter it runs on a LibMTL model."""
    net = SharedTrunkNet(tasks=3)
    x, y = make_batch(tasks=3)
    lib = libmtl()

    class Model(lib.architecture.HPS, to_libmtl("nash_mtl")):
        pass

    model = Model(
        task_name=["t0", "t1", "t2"],
        encoder_class=lambda: copy.deepcopy(net.trunk),
        decoders=torch.nn.ModuleDict({f"t{i}": copy.deepcopy(h) for i, h in enumerate(net.heads)}),
        rep_grad=False,
        multi_input=False,
        device=torch.device("cpu"),
    )
    model.init_param()
    model.zero_grad(set_to_none=False)
    weights = model.backward(libmtl_losses(model, x, y))
    expected = mtlopt.MTLOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), "nash_mtl")
    expected.backward(losses_of(net, x, y))
    torch.testing.assert_close(
        _shared_grad(model.encoder), _shared_grad(net.trunk), rtol=1e-4, atol=1e-6
    )
    assert weights.shape == (3,) and (weights > 0).all()
