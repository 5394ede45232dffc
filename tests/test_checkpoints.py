"""Checkpoints load with PyTorch's defaults, are checked whole before anything changes, and refuse
another strategy's or another task set's state."""

from __future__ import annotations

import io
import itertools

import pytest
import torch
from conftest import SharedTrunkNet, make_batch
from strategies_under_test import by_name_only, drive, make

import mtlopt

NAMES = by_name_only()
STATEFUL = [n for n in NAMES if mtlopt.info(n).stateful]


def _trained(name: str, tasks: int = 2, steps: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    model = SharedTrunkNet(tasks=tasks)
    opt = mtlopt.MTLOptimizer(
        torch.optim.Adam(model.parameters(), lr=1e-2), make(name, **({"window": 1}
                                                                     if name == "dwa" else {}))
    )
    for step in range(steps):
        x, y = make_batch(tasks=tasks, seed=step)

        def closure(x=x, y=y):
            return {f"t{i}": ((p - y[:, i]) ** 2).mean() * (i + 1) for i, p in enumerate(model(x))}

        opt.zero_grad()
        drive(opt, closure)
    return model, opt


def _round_trip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)  # PyTorch's default: weights_only=True


@pytest.mark.parametrize("name", NAMES)
def test_a_checkpoint_loads_with_torch_load_defaults_and_resumes(name):
    model, opt = _trained(name)
    saved_model, saved_opt = _round_trip(model.state_dict()), _round_trip(opt.state_dict())
    assert saved_opt["strategy_name"] == name and saved_opt["task_names"] == ["t0", "t1"]
    fresh_model, fresh_opt = _trained(name, steps=0, seed=1)
    fresh_model.load_state_dict(saved_model)
    fresh_opt.load_state_dict(saved_opt)
    assert repr(fresh_opt.strategy.state_dict()) == repr(opt.strategy.state_dict())


@pytest.mark.parametrize("name", STATEFUL)
def test_a_failed_load_changes_nothing(name):
    """A 2-task checkpoint into a 3-task optimizer is refused, and the optimizer trains on exactly
    as an untouched twin does."""
    _, two = _trained(name, tasks=2)
    saved = two.state_dict()
    saved["task_names"] = ["t0", "t1", "t2"]  # so that only the strategy's own check can object
    model, opt = _trained(name, tasks=3)
    twin_model, twin = _trained(name, tasks=3)
    with pytest.raises((ValueError, KeyError, RuntimeError)):
        opt.load_state_dict(saved)
    assert repr(opt.strategy.state_dict()) == repr(twin.strategy.state_dict())
    x, y = make_batch(tasks=3, seed=9)
    for m, o in ((model, opt), (twin_model, twin)):
        o.zero_grad()
        drive(o, lambda m=m: {f"t{i}": ((p - y[:, i]) ** 2).mean() for i, p in enumerate(m(x))})
    for a, b in zip(model.parameters(), twin_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_another_strategy_checkpoint_is_refused_for_every_pair():
    saved = {name: _trained(name, steps=1)[1].state_dict() for name in NAMES}
    for a, b in itertools.permutations(NAMES, 2):
        _, opt = _trained(b, steps=1)
        before = repr(opt.strategy.state_dict())
        with pytest.raises(ValueError, match=f"saved with strategy '{a}'"):
            opt.load_state_dict(saved[a])
        assert repr(opt.strategy.state_dict()) == before
        with pytest.raises(ValueError, match=f"saved by strategy '{a}'"):
            opt.strategy.load_state_dict(saved[a]["strategy"])


def test_another_task_set_is_refused(net):
    _, opt = _trained("uw")
    saved = opt.state_dict()
    saved["task_names"] = ["seg", "depth"]
    with pytest.raises(ValueError, match="saved with tasks"):
        opt.load_state_dict(saved)


def test_an_optimizer_that_has_not_stepped_takes_the_saved_tasks():
    _, opt = _trained("uw")
    model = SharedTrunkNet()
    fresh = mtlopt.MTLOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), "uw")
    fresh.load_state_dict(_round_trip(opt.state_dict()))
    assert fresh.task_names == ["t0", "t1"]
    torch.testing.assert_close(fresh.strategy.learned, opt.strategy.learned)
