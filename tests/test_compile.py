"""torch.compile: a compiled model trains with the wrapper and matches eager training."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from conftest import SharedTrunkNet, losses_of, make_batch

import mtlopt


def _train(model, forward, name, steps=4):
    kwargs = {"seed": 0} if name == "pcgrad" else {}
    base = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt = mtlopt.MTLOptimizer(base, name, shared=model.trunk, **kwargs)
    for s in range(steps):
        x, y = make_batch(seed=s)
        opt.zero_grad()
        opt.step(losses_of(forward, x, y))


@pytest.mark.parametrize("name", ["pcgrad", "nash_mtl", "ew"])
def test_compiled_model_trains_like_the_eager_model(name):
    """AOTAutograd backend: dynamo capture and a compiled backward that each task's
    ``autograd.grad`` calls with ``retain_graph`` (no C++ toolchain needed). The compiled graph is
    opaque to the search for shared parameters, so they are declared."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = SharedTrunkNet()
    compiled = copy.deepcopy(eager)
    _train(eager, eager, name)
    _train(compiled, torch.compile(compiled, backend="aot_eager"), name)
    for p, q in zip(eager.parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(shutil.which("cc") is None, reason="inductor needs a C compiler")
def test_inductor_compiled_model_trains():
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = SharedTrunkNet()
    compiled = copy.deepcopy(eager)
    _train(eager, eager, "mgda")
    _train(compiled, torch.compile(compiled), "mgda")
    for p, q in zip(eager.parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_a_compiled_model_without_declared_shared_parameters_gets_a_clear_error():
    torch._dynamo.reset()
    model = SharedTrunkNet()
    opt = mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "mgda")
    x, y = make_batch()
    with pytest.raises(ValueError, match=r"shared=model\.trunk"):
        opt.step(losses_of(torch.compile(model, backend="aot_eager"), x, y))
