"""FORUM (Ye et al., ECAI 2024): the QP (14) against a fine grid, one step against an independent
re-implementation of the official code's procedure (a deep copy of the model, K SGD steps,
``g_final`` assembled as in Baijiong-Lin/FORUM's trainer; only cvxpy is replaced by the QP solver
checked in the first test), the errors, the absent-task rule and a checkpoint."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from torch import nn

import mtlopt
from mtlopt.strategies.forum import FORUM, progress_qp


class Net(nn.Module):
    def __init__(self, tasks: int = 3) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(tasks))

    def forward(self, x):
        z = self.trunk(x)
        return [h(z).squeeze(-1) for h in self.heads]


def _data(seed: int, tasks: int = 3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(16, 5, generator=g, dtype=torch.float64),
            torch.randn(16, tasks, generator=g, dtype=torch.float64))


def _losses(model, batch):
    x, y = batch
    return [((o - y[:, t]) ** 2).mean() for t, o in enumerate(model(x))]


@pytest.mark.parametrize("seed", range(6))
def test_the_qp_matches_a_fine_grid(seed):
    """Two tasks: w_1 = 1 − w_0, and for each w_0 the objective is a parabola in w_q above
    max(0, w·π); the grid's best point and SLSQP's agree to the grid's resolution."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((3, 6))
    gram = a @ a.T
    pi = rng.uniform(-0.5, 0.5, 2)
    reward = float(rng.uniform(0.1, 2.0))
    w = progress_qp(gram, pi, reward)
    assert w.min() >= 0 and abs(w[:2].sum() - 1) < 1e-9 and w[2] >= w[:2] @ pi - 1e-9

    def objective(v):
        return v @ gram @ v - v[-1] * reward

    best = np.inf
    for w0 in np.linspace(0, 1, 20001):
        lower = max(0.0, w0 * pi[0] + (1 - w0) * pi[1])
        c = gram[2, 0] * w0 + gram[2, 1] * (1 - w0)
        wq = max(lower, (reward - 2 * c) / (2 * gram[2, 2]))
        best = min(best, objective(np.array([w0, 1 - w0, wq])))
    assert objective(w) <= best + 1e-7


def _reference(model, train, val, logits, ema, step, steps_per_epoch=None,
               eta=0.1, inner_steps=5, rho=0.1):
    """One FORUM step as the official trainer computes it (deep copy, SGD inner loop)."""
    params = list(model.parameters())

    def flat(loss, retain=True):
        grads = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
        return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                          for p, g in zip(params, grads, strict=True)])

    weights = torch.softmax(torch.tensor(logits), 0)
    train_losses = torch.stack(_losses(model, train))
    g_f = flat(weights @ train_losses)
    inner = copy.deepcopy(model)
    inner_opt = torch.optim.SGD(inner.parameters(), lr=eta)
    for _ in range(inner_steps):
        loss = weights @ torch.stack(_losses(inner, train))
        if loss.item() > 1e5:
            break
        inner_opt.zero_grad()
        loss.backward()
        inner_opt.step()
    inner_losses = torch.stack(_losses(inner, train)).detach()
    jac = torch.diag(weights) - torch.outer(weights, weights)
    q = torch.cat([jac @ (train_losses.detach() - inner_losses), g_f])
    upper = torch.stack([flat(loss) for loss in _losses(model, val)])
    unit = upper / (1e-8 + upper.norm(dim=1, keepdim=True))
    unit = torch.cat([torch.zeros(3, 3, dtype=unit.dtype), unit], dim=1)
    pi = (rho - (unit @ q) / (q @ q + 1e-8)).numpy()
    a = torch.cat([unit, q[None]])
    solution = progress_qp((a @ a.T).numpy(), pi, rho * float(q @ q + 1e-8))
    epoch = step if steps_per_epoch is None else step // steps_per_epoch
    new_ema = ema + (1 / (epoch + 1) ** 0.75) * (solution[:3] - ema)
    nu = max(float(new_ema @ pi), 0.0)
    g_final = torch.tensor(new_ema) @ unit + nu * q
    return g_final[:3].numpy(), g_final[3:], new_ema, nu


def _forum(model, val_seed=2, **options):
    return mtlopt.MTLOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), "forum", model=model,
        validation=lambda: _losses(model, _data(val_seed)), **options,
    )


def test_one_step_equals_the_official_procedure():
    torch.manual_seed(0)
    model = Net().double()
    twin = copy.deepcopy(model)
    train = _data(1)
    opt = _forum(model, weight_lr=0.05)
    opt.zero_grad()
    info = opt.step(lambda: _losses(model, train))
    alpha_grad, omega_grad, ema, nu = _reference(twin, train, _data(2), np.zeros(3), np.zeros(3), 0)
    strategy = opt.strategy
    assert isinstance(strategy, FORUM)
    np.testing.assert_allclose(strategy.ema, ema, rtol=1e-9, atol=1e-12)
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got, omega_grad, rtol=1e-9, atol=1e-12)
    # Adam's first step moves each α by lr against the sign of its gradient ν · ∇_α q.
    np.testing.assert_array_equal(np.sign(strategy.logits), -np.sign(alpha_grad))
    torch.testing.assert_close(info.weights.double(), torch.full((3,), nu / 3, dtype=torch.float64))
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)  # lr 0: the inner steps left no trace
    for b, c in zip(model.buffers(), twin.buffers(), strict=True):
        assert torch.equal(b, c) or b.dtype == torch.long  # BatchNorm statistics: one forward each


def test_the_ema_counts_epochs_when_told_their_length():
    torch.manual_seed(0)
    model = Net().double()
    opt = _forum(model, steps_per_epoch=2)
    emas = []
    for seed in (3, 4, 5):
        opt.zero_grad()
        opt.step(lambda seed=seed: _losses(model, _data(seed)))
        emas.append(opt.strategy.ema.copy())
    # steps 0 and 1 are epoch 0 (rate 1: the EMA is the latest QP solution), step 2 epoch 1
    assert np.isclose(emas[0].sum(), 1) and np.isclose(emas[1].sum(), 1)
    assert np.isclose(emas[2].sum(), 1)  # a convex combination of two simplex points
    assert opt.strategy.steps == 3


def test_errors_say_what_to_pass_and_change_nothing():
    model = Net().double()
    train = _data(6)
    opt = _forum(model)
    opt.zero_grad()
    with pytest.raises(TypeError, match="closure"):
        opt.step(_losses(model, train))
    assert all(p.grad is None for p in model.parameters())
    bare = mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "forum")
    with pytest.raises(TypeError, match="model and validation"):
        bare.step(lambda: _losses(model, train))
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="inner_steps"):
        mtlopt.create("forum", inner_steps=0)


def test_an_absent_task_waits_and_a_checkpoint_resumes_the_same_trajectory():
    torch.manual_seed(0)
    model = Net().double()

    def make(m):
        return mtlopt.MTLOptimizer(
            torch.optim.SGD(m.parameters(), lr=0.01), "forum", model=m, weight_lr=0.05,
            validation=lambda: dict(zip("abc", _losses(m, _data(9)), strict=True)),
        )

    def step(opt, m, seed, keep="abc"):
        opt.zero_grad()
        return opt.step(lambda: {k: v for k, v in zip("abc", _losses(m, _data(seed)),
                                                      strict=True) if k in keep})

    opt = make(model)
    step(opt, model, 7)
    before = opt.strategy.logits.copy(), opt.strategy.ema.copy()
    info = step(opt, model, 8, keep="ac")
    assert opt.strategy.logits[1] == before[0][1] and opt.strategy.ema[1] == before[1][1]
    assert torch.isnan(info.weights[1]) or info.weights[1] == 0

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    twin = copy.deepcopy(model)
    for seed in (10, 11):
        step(opt, model, seed)
    buffer.seek(0)
    saved = torch.load(buffer)
    twin.load_state_dict(saved["model"])
    resumed = make(twin)
    resumed.load_state_dict(saved["opt"])
    for seed in (10, 11):
        step(resumed, twin, seed)
    np.testing.assert_array_equal(resumed.strategy.ema, opt.strategy.ema)
    assert resumed.strategy.steps == opt.strategy.steps == 4
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
