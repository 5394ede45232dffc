"""``jacobian_rows=k``: G and the update holding k rows of J (mtlopt.chunked) against the whole J."""

from __future__ import annotations

import pytest
import torch
from test_gramian_engine import SERVED, Trunk, _inputs, run

import mtlopt
import mtlopt.chunked


@pytest.mark.parametrize("strategy", SERVED)
def test_every_served_strategy_takes_the_same_steps_one_row_at_a_time(strategy):
    reference, ref_infos = run(Trunk, strategy, "jacobian")
    params, infos = run(Trunk, strategy, "jacobian", jacobian_rows=1)
    assert [i.engine for i in infos] == ["chunked"] * 3
    for a, b in zip(reference, params, strict=True):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=2e-5)
    for a, b in zip(ref_infos, infos, strict=True):
        if a.weights is not None:
            torch.testing.assert_close(b.weights, a.weights, atol=2e-5, rtol=2e-5, equal_nan=True)
        torch.testing.assert_close(b.cosines, a.cosines, atol=2e-5, rtol=2e-5, equal_nan=True)


def test_backward_passes_and_rows_held(monkeypatch):
    """T = 5, k = 2: blocks {0, 1}, {2, 3}, {4}; 5 passes for the blocks, 3 + 1 for the later
    tasks' columns, 1 for the update."""
    calls = []
    grad = torch.autograd.grad

    def counting(outputs, inputs, *args, **kwargs):
        calls.append(len(inputs))
        return grad(outputs, inputs, *args, **kwargs)

    monkeypatch.setattr(mtlopt.chunked.torch.autograd, "grad", counting)
    torch.manual_seed(0)
    model = Trunk(tasks=5)
    opt = mtlopt.MTLOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), "mgda", engine="jacobian", jacobian_rows=2
    )
    info = opt.step(model(_inputs(0)))
    assert info.engine == "chunked"
    assert len(calls) == 5 + 4 + 1


def test_more_rows_than_tasks_is_the_jacobian_path():
    _, infos = run(Trunk, "upgrad", "jacobian", jacobian_rows=3)
    assert [i.engine for i in infos] == ["jacobian"] * 3


def test_the_engine_keeps_the_steps_it_takes():
    """engine="gramian" takes the step where it finds the layers; jacobian_rows only applies
    where it does not."""
    _, infos = run(Trunk, "mgda", "gramian", jacobian_rows=1)
    assert [i.engine for i in infos] == ["gramian"] * 3


@pytest.mark.parametrize("rows", [0, -1, 1.5, True, "2"])
def test_bad_row_counts_are_refused(rows):
    model = Trunk()
    with pytest.raises(ValueError, match="jacobian_rows must be a positive int"):
        mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "mgda", jacobian_rows=rows)


def test_a_strategy_that_reads_J_is_refused():
    model = Trunk()
    with pytest.raises(ValueError, match="graddrop reads J itself"):
        mtlopt.MTLOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), "graddrop", jacobian_rows=2
        )


def test_a_second_micro_batch_is_refused_and_changes_nothing():
    torch.manual_seed(0)
    model = Trunk()
    opt = mtlopt.MTLOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), "mgda", engine="jacobian", jacobian_rows=1
    )
    opt.zero_grad()
    first = opt.backward(model(_inputs(0)))
    written = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="one backward per step"):
        opt.backward(model(_inputs(1)))
    assert all(torch.equal(p.grad, w) for p, w in zip(model.parameters(), written, strict=True))
    assert opt.step() is first
