"""MOML (Ye et al., NeurIPS 2021): the upper gradients against autograd through the inner step, the
min-norm combination, the step, the absent-task rule and the errors.

LibMTL implements MOML in its Trainer at the repository head only (the installable 1.1.5 has no
MOML), so its formula ``−η g_F,tᵀ G_fᵀ ∂softmax/∂α`` is checked here against autograd through a
functional copy of the inner step, which is the same quantity computed without the formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

import mtlopt
from mtlopt.strategies.moml import MOML


class Net(nn.Module):
    def __init__(self, tasks: int = 3) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(tasks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.trunk(x)
        return [h(z).squeeze(-1) for h in self.heads]


def _data(seed: int, tasks: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randn(
        16, tasks, generator=g, dtype=torch.float64
    )


def _losses(model: nn.Module, batch) -> list[torch.Tensor]:
    x, y = batch
    return [((o - y[:, t]) ** 2).mean() for t, o in enumerate(model(x))]


def test_upper_gradients_equal_autograd_through_the_inner_step():
    torch.manual_seed(0)
    model = Net().double()
    train, val = _data(1), _data(2)
    strategy = MOML(model=model, validation=lambda: _losses(model, val), inner_lr=0.3)
    strategy.num_tasks = 3
    logits = np.array([0.3, -0.2, 0.5])
    losses = torch.stack(_losses(model, train))
    before = {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    got = strategy.upper_gradients(losses, logits)
    # the model is back at θ, buffers (BatchNorm's statistics) included
    for n, t in [*model.named_parameters(), *model.named_buffers()]:
        assert torch.equal(t.detach(), before[n]), n

    names = [n for n, p in model.named_parameters()]
    theta = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    lower = [
        [torch.zeros_like(p) if g is None else g for p, g in zip(
            model.parameters(),
            torch.autograd.grad(loss, list(model.parameters()), allow_unused=True, retain_graph=True),
            strict=True)]
        for loss in _losses(model, train)
    ]

    def upper(alpha: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(alpha, 0)
        moved = {
            n: theta[n] - 0.3 * sum(weights[j] * lower[j][k] for j in range(3))
            for k, n in enumerate(names)
        }
        return torch.stack(_losses(_Bound(model, {**moved, **buffers}), val))

    expected = torch.autograd.functional.jacobian(upper, torch.tensor(logits))
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-10, atol=1e-12)


class _Bound(nn.Module):
    """``model`` evaluated at the given parameters and buffers (``functional_call``)."""

    def __init__(self, model: nn.Module, values: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.model, self.values = model, values

    def forward(self, x):
        return functional_call(self.model, self.values, (x,))


def test_first_step_moves_alpha_along_the_min_norm_point_and_trains_on_the_new_weights():
    torch.manual_seed(0)
    model = Net().double()
    train, val = _data(3), _data(4)
    opt = mtlopt.MTLOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.01), "moml", model=model,
        validation=lambda: _losses(model, val), weight_lr=0.05,
    )
    strategy = opt.strategy
    assert isinstance(strategy, MOML)
    strategy.num_tasks = 3
    rows = strategy.upper_gradients(torch.stack(_losses(model, train)), np.zeros(3))
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)

    opt.zero_grad()
    info = opt.backward(_losses(model, train))
    given = [p.grad.clone() for p in model.parameters()]
    reference = Net().double()
    reference.load_state_dict(model.state_dict())
    weighted = zip(info.weights.tolist(), _losses(reference, train), strict=True)
    sum(w * loss for w, loss in weighted).backward()
    for g, p in zip(given, reference.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)

    opt.step()
    # Adam's first step is lr · d / (|d| + eps): α moves by lr against the sign of each entry of
    # d, the min-norm point of the unit upper gradients' hull; the step's weights are softmax(α).
    alpha = strategy.logits
    np.testing.assert_allclose(np.abs(alpha), 0.05, rtol=1e-4)
    np.testing.assert_array_equal(np.sign(_min_norm(unit)), -np.sign(alpha))
    expected = torch.softmax(torch.tensor(alpha), 0)
    torch.testing.assert_close(info.weights, expected.to(info.weights.dtype))


def _min_norm(rows: np.ndarray) -> np.ndarray:
    """The min-norm point of the rows' convex hull by a fine projected-gradient loop (reference)."""
    gram = rows @ rows.T
    lam = np.full(len(rows), 1 / len(rows))
    for _ in range(20000):
        lam = _project_simplex(lam - 0.05 * gram @ lam)
    return lam @ rows


def _project_simplex(v: np.ndarray) -> np.ndarray:
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1
    k = np.nonzero(u - css / np.arange(1, len(v) + 1) > 0)[0][-1]
    return np.maximum(v - css[k] / (k + 1), 0)


def test_errors_say_what_to_pass_and_change_nothing():
    model = Net().double()
    train = _data(5)
    before = [p.detach().clone() for p in model.parameters()]
    opt = mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "moml")
    opt.zero_grad()
    with pytest.raises(TypeError, match="model and validation"):
        opt.backward(_losses(model, train))
    assert all(p.grad is None for p in model.parameters())

    short = mtlopt.MTLOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), "moml", model=model,
        validation=lambda: {"a": _losses(model, train)[0]},
    )
    short.zero_grad()
    with pytest.raises(ValueError, match="gave no loss for task"):
        short.backward(dict(zip("abc", _losses(model, train), strict=True)))
    assert all(p.grad is None for p in model.parameters())
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.detach(), b)
    assert short.strategy.logits is None or np.all(short.strategy.logits == 0)


def test_an_absent_task_keeps_its_alpha_and_the_weights_cover_the_present_tasks():
    torch.manual_seed(0)
    model = Net().double()
    val = _data(7)
    opt = mtlopt.MTLOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.01), "moml", model=model,
        validation=lambda: dict(zip("abc", _losses(model, val), strict=True)),
    )
    for seed in (8, 9):
        opt.zero_grad()
        opt.step(dict(zip("abc", _losses(model, _data(seed)), strict=True)))
    logits = opt.strategy.logits.copy()
    opt.zero_grad()
    losses = _losses(model, _data(10))
    info = opt.step({"a": losses[0], "c": losses[2]})
    assert opt.strategy.logits[1] == logits[1]
    assert opt.strategy.logits[0] != logits[0] and opt.strategy.logits[2] != logits[2]
    assert torch.isnan(info.weights[1]) or info.weights[1] == 0
    present = info.weights[[0, 2]]
    assert float(present.sum()) == pytest.approx(1.0)


def test_a_checkpoint_resumes_the_same_trajectory():
    """α and Adam's moments go through ``state_dict`` (also via ``torch.save`` / ``torch.load``
    with PyTorch's defaults): a resumed run takes the same steps as the uninterrupted one."""
    import copy
    import io

    def make(model):
        return mtlopt.MTLOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.01), "moml", model=model,
            validation=lambda: _losses(model, _data(99)), weight_lr=0.05,
        )

    torch.manual_seed(0)
    model = Net().double()
    opt = make(model)
    for seed in (11, 12):
        opt.zero_grad()
        opt.step(_losses(model, _data(seed)))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    twin = copy.deepcopy(model)
    for seed in (13, 14):
        opt.zero_grad()
        opt.step(_losses(model, _data(seed)))

    buffer.seek(0)
    saved = torch.load(buffer)
    twin.load_state_dict(saved["model"])
    resumed = make(twin)
    resumed.load_state_dict(saved["opt"])
    for seed in (13, 14):
        resumed.zero_grad()
        resumed.step(_losses(twin, _data(seed)))
    np.testing.assert_array_equal(resumed.strategy.logits, opt.strategy.logits)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
