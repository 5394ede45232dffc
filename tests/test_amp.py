"""Mixed precision: GradScaler with per-task gradients (unscale before combining, skip on overflow)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import SharedTrunkNet, losses_of, make_batch
from strategies_under_test import RANDOM

import mtlopt

# Nash-MTL is not homogeneous in J (a wrapper that combined the scaled gradients fails this test with
# it); the others cover stateful, random and loss-reading strategies of both kinds.
STRATEGIES = ["nash_mtl", "gradnorm", "cagrad", "graddrop", "db_mtl", "dwa", "uw", "famo", "ew"]
STRATEGIES += ["pcgrad", "mgda", "imtl"]


def _optimizer(model, name, scaler=None):
    kwargs = {"seed": 0} if name in RANDOM else {}
    kwargs["num_tasks"] = 2
    if name == "dwa":
        kwargs["window"] = 2
    base = torch.optim.Adam(model.parameters(), lr=1e-2)
    return mtlopt.MTLOptimizer(base, name, scaler=scaler, **kwargs)


def _train(model, opt, steps, scaler=None, seed=0):
    for s in range(steps):
        x, y = make_batch(seed=seed + s)
        opt.zero_grad()

        def closure(x=x, y=y):
            return losses_of(model, x, y)

        opt.step(closure)
        if scaler is not None:
            scaler.update()


@pytest.mark.parametrize("name", STRATEGIES)
def test_a_scaled_run_equals_the_unscaled_run_bit_for_bit(name):
    """GradScaler's scales are powers of two: scaling the losses and unscaling each task's gradient
    before combining is exact, so the scaled run must equal the plain one."""
    torch.manual_seed(0)
    plain = SharedTrunkNet()
    scaled = copy.deepcopy(plain)
    _train(plain, _optimizer(plain, name), 6)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    _train(scaled, _optimizer(scaled, name, scaler), 6, scaler)
    for p, q in zip(plain.parameters(), scaled.parameters(), strict=True):
        assert torch.equal(p, q)


def test_backward_then_scaler_step_equals_step_with_losses():
    torch.manual_seed(0)
    one = SharedTrunkNet()
    two = copy.deepcopy(one)
    scaler_one = torch.amp.GradScaler("cpu")
    scaler_two = torch.amp.GradScaler("cpu")
    opt_one = _optimizer(one, "pcgrad", scaler_one)
    opt_two = _optimizer(two, "pcgrad", scaler_two)
    for s in range(3):
        x, y = make_batch(seed=s)
        opt_one.zero_grad()
        opt_one.step(losses_of(one, x, y))
        scaler_one.update()
        opt_two.zero_grad()
        opt_two.backward(losses_of(two, x, y))
        torch.nn.utils.clip_grad_norm_(two.parameters(), 1e9)  # scaled .grad: the usual recipe
        scaler_two.step(opt_two)
        scaler_two.update()
    for p, q in zip(one.parameters(), two.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", ["pcgrad", "nash_mtl", "dwa"])
def test_an_overflow_in_one_task_skips_the_step_and_lowers_the_scale(name):
    torch.manual_seed(0)
    model = SharedTrunkNet()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    opt = _optimizer(model, name, scaler)
    _train(model, opt, 2, scaler)
    before = copy.deepcopy(model.state_dict())
    strategy_before = copy.deepcopy(opt.strategy.state_dict())
    adam_steps = [s["step"].clone() for s in opt.state.values()]

    x, y = make_batch(seed=50)
    opt.zero_grad()
    losses = losses_of(model, x, y)
    info = opt.step([losses[0], losses[1] * 1e34])  # finite loss, overflowing scaled gradient
    scaler.update()

    assert info.skipped and "overflow" in info.reason and opt.last_step is info
    assert scaler.get_scale() == 2.0**15
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert [s["step"] for s in opt.state.values()] == adam_steps
    assert repr(opt.strategy.state_dict()) == repr(strategy_before)

    _train(model, opt, 1, scaler, seed=60)  # and training goes on
    assert not opt.last_step.skipped
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_scaler_state_is_saved_and_restored():
    model = SharedTrunkNet()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    opt = _optimizer(model, "mgda", scaler)
    _train(model, opt, 3, scaler)
    assert scaler.get_scale() == 2.0**13
    state = opt.state_dict()
    fresh_scaler = torch.amp.GradScaler("cpu")
    fresh = _optimizer(SharedTrunkNet(), "mgda", fresh_scaler)
    fresh.load_state_dict(state)
    assert fresh_scaler.get_scale() == 2.0**13
    assert fresh_scaler.state_dict() == scaler.state_dict()


def test_stepping_scaled_gradients_without_the_scaler_is_refused():
    model = SharedTrunkNet()
    scaler = torch.amp.GradScaler("cpu")
    opt = _optimizer(model, "pcgrad", scaler)
    x, y = make_batch()
    opt.backward(losses_of(model, x, y))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match=r"scaler\.step\(opt\)"):
        opt.step()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_scaler_must_be_a_grad_scaler():
    with pytest.raises(TypeError, match="GradScaler"):
        mtlopt.MTLOptimizer(torch.optim.SGD(SharedTrunkNet().parameters(), lr=0.1), scaler=2.0)


def _losses_fall_under_autocast(name: str, device: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = SharedTrunkNet(hidden=32).to(device)
    scaler = torch.amp.GradScaler(device)
    opt = _optimizer(model, name, scaler)
    x, y = (t.to(device) for t in make_batch(n=64, seed=1))

    def closure():
        with torch.autocast(device, dtype=dtype):
            return [loss.float() for loss in losses_of(model, x, y)]

    first = torch.stack(closure()).detach()
    for _ in range(30):
        opt.zero_grad()
        opt.step(closure)
        scaler.update()
    last = torch.stack(closure()).detach()
    assert torch.isfinite(last).all() and (last < first).all()


@pytest.mark.parametrize("name", ["pcgrad", "famo"])
def test_trains_under_bfloat16_autocast(name):
    _losses_fall_under_autocast(name, "cpu", torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_float16_autocast_on_cuda():
    _losses_fall_under_autocast("nash_mtl", "cuda", torch.float16)


def test_a_skipped_non_finite_loss_goes_through_the_scaler_cleanly():
    model = SharedTrunkNet()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    opt = mtlopt.MTLOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), "mgda", scaler=scaler, nonfinite="skip"
    )
    before = copy.deepcopy(model.state_dict())
    x, y = make_batch()
    losses = losses_of(model, x, y)
    info = opt.step([losses[0], losses[1] * float("nan")])
    scaler.update()
    assert info.skipped and "non-finite loss" in info.reason
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


@pytest.mark.parametrize("name", ["pcgrad", "ew"])
@pytest.mark.parametrize("explicit", [False, True])
def test_a_loop_that_zeroes_through_the_model_survives_an_overflow(name, explicit):
    """``model.zero_grad()`` in place of ``opt.zero_grad()``: after an overflow the next steps go
    through the scaler as usual (torch's own loops zero either way)."""
    torch.manual_seed(0)
    model = SharedTrunkNet()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    opt = _optimizer(model, name, scaler)
    for s in range(4):
        x, y = make_batch(seed=s)
        model.zero_grad()
        losses = losses_of(model, x, y)
        if s == 1:
            losses = [losses[0] * 1e38, losses[1]]  # overflows once scaled
        if explicit:
            opt.backward(losses)
            scaler.step(opt)
        else:
            opt.step(losses)
        scaler.update()
    assert scaler.get_scale() == 2.0**13
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.last_step is not None and not opt.last_step.skipped
