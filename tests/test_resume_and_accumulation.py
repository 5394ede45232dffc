"""Exact resume and gradient accumulation, for every registered strategy.

Resume: train 20 steps, save, train 20 more; versus load into fresh objects (created under another
global RNG state) and train the same 20: parameters identical bit for bit. Random strategies keep
their default ``seed=None`` so that the saved generator state is what makes them agree.

Accumulation: 4 micro-batches of 8 samples (losses divided by 4) equal one batch of 32.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import SharedTrunkNet, losses_of, make_batch
from strategies_under_test import by_name_only, drive, plain
from token_models import TinyViT, batch, losses

import mtlopt

NAMES = by_name_only()
NONLINEAR_IN_LOSSES = [
    n for n in NAMES if not getattr(mtlopt.create(n, num_tasks=2), "linear_in_losses", True)
]


def _options(name: str) -> dict:
    kwargs: dict = {"num_tasks": 2}
    if name == "dwa":
        kwargs["window"] = 3  # weights move within the 40 steps
    if name == "nash_mtl":
        kwargs["update_weights_every"] = 3  # the cached weights are state too
    return kwargs


def _train(model, opt, steps, seed):
    for s in range(steps):
        x, y = make_batch(seed=seed + s)
        opt.zero_grad()
        drive(opt, lambda x=x, y=y: losses_of(model, x, y))  # FAMO learns from the re-evaluation


@pytest.mark.parametrize("name", NAMES)
def test_resume_after_20_steps_continues_bit_for_bit(name):
    torch.manual_seed(1)
    model = SharedTrunkNet()
    opt = mtlopt.MTLOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), name, **_options(name))
    _train(model, opt, 20, seed=0)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    _train(model, opt, 20, seed=100)

    torch.manual_seed(999)  # another global RNG state: a random strategy gets another seed
    fresh = SharedTrunkNet()
    fresh_opt = mtlopt.MTLOptimizer(
        torch.optim.Adam(fresh.parameters(), lr=1e-2), name, **_options(name)
    )
    fresh.load_state_dict(saved_model)
    fresh_opt.load_state_dict(saved_opt)
    _train(fresh, fresh_opt, 20, seed=100)
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)
    for p, q in zip(opt.strategy.parameters(), fresh_opt.strategy.parameters(), strict=True):
        assert torch.equal(p, q)


def test_dtme_resume_after_20_steps_continues_bit_for_bit():
    def make(seed):
        torch.manual_seed(seed)
        model = TinyViT()
        dtme = mtlopt.create(
            "dtme", blocks=model, num_tasks=2, base="pcgrad", model=model,
            analysis_steps=12, covariance_steps=3,
        )  # fmt: skip
        return model, mtlopt.MTLOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), dtme)

    def train(model, opt, steps, seed):
        for s in range(steps):
            x, y = batch(seed=seed + s)
            opt.zero_grad()
            opt.step(losses(model, x, y))

    model, opt = make(0)
    train(model, opt, 20, 0)  # the expansion happened at step 12
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt, 20, 100)
    fresh, fresh_opt = make(123)
    fresh_opt.load_state_dict(saved_opt)
    fresh.load_state_dict(saved_model)
    train(fresh, fresh_opt, 20, 100)
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", plain([n for n in NAMES if n not in NONLINEAR_IN_LOSSES]))
def test_four_micro_batches_of_8_equal_one_batch_of_32(name):
    torch.manual_seed(3)
    one = SharedTrunkNet()
    four = copy.deepcopy(one)
    kwargs = _options(name) | ({"seed": 0} if "seed" in _seed_parameter(name) else {})
    opt_one = mtlopt.MTLOptimizer(torch.optim.Adam(one.parameters(), lr=1e-2), name, **kwargs)
    opt_four = mtlopt.MTLOptimizer(torch.optim.Adam(four.parameters(), lr=1e-2), name, **kwargs)
    for step in range(8):
        x, y = make_batch(n=32, seed=step)
        opt_one.zero_grad()
        opt_one.step(losses_of(one, x, y))
        opt_four.zero_grad()
        for part in range(4):
            rows = slice(8 * part, 8 * part + 8)
            opt_four.backward([loss / 4 for loss in losses_of(four, x[rows], y[rows])])
        opt_four.step()
    for p, q in zip(one.parameters(), four.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for p, q in zip(opt_one.strategy.parameters(), opt_four.strategy.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NONLINEAR_IN_LOSSES)
def test_weightings_nonlinear_in_the_losses_warn_under_accumulation(name):
    assert set(NONLINEAR_IN_LOSSES) == {"gls", "stch", "famo"} | {
        "cosmos", "go4align", "igb", "ldc_mtl", "pbi"  # issue 18 (helper i18a)
    }
    model = SharedTrunkNet()
    opt = mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), name, num_tasks=2)
    x, y = make_batch(n=16)
    opt.backward(losses_of(model, x[:8], y[:8]))
    with pytest.warns(UserWarning, match="accumulated so far"):
        opt.backward(losses_of(model, x[8:], y[8:]))


def _seed_parameter(name: str) -> set[str]:
    import inspect

    return set(inspect.signature(type(mtlopt.create(name, num_tasks=2)).__init__).parameters)


@pytest.mark.parametrize("strategy", ["ew", "uw", "dwa"])
def test_loss_strategies_keep_autograds_gradients_without_aliasing(strategy):
    """The loss path hands autograd's gradients to .grad without a copy where nothing else holds
    them; two parameters that autograd gives the same tensor (the operands of an addition), a
    strategy's own parameters and a second micro-batch must still accumulate exactly as
    loss.backward() does."""
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    w = torch.nn.Parameter(torch.randn(4))

    def losses(x):
        s = (a + b) * w  # ∂/∂a and ∂/∂b: one tensor (not a view) out of AddBackward
        return [(s * x).sum(), (s * x).pow(2).sum()]

    xs = [torch.randn(4) for _ in range(2)]
    opt = mtlopt.MTLOptimizer(torch.optim.SGD([a, b, w], lr=0.1), strategy, tasks=["p", "q"])
    opt.zero_grad()
    for x in xs:
        info = opt.backward(losses(x))
    got = [p.grad.clone() for p in (a, b, w)]
    assert a.grad.data_ptr() != b.grad.data_ptr()
    total = [sum(lo[i] for lo in map(losses, xs)) for i in range(2)]
    reference = sum(float(info.weights[i]) * total[i] for i in range(2))
    expected = torch.autograd.grad(reference, [a, b, w])
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)
