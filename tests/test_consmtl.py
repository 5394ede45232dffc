"""ConsMTL (CVPR 2025): the gradients written equal the authors' code's, written out here as that
code does it: per-task gradients of the shared parameters, ``α`` from scipy's ``least_squares``
on ``G α − α^{-1/2}`` from ``1/T`` with ``α ≥ 0``, the update ``T Σ α_t g_t`` clipped as
``clip_grad_norm_`` does (``max_norm / (‖d‖ + 1e-6)``); ``δ_t = ∂ℓ_t/∂z`` with a graph,
``δ̄ = Σ α_t δ_t`` detached, the extra head gradient ``∇_θ(−λ⟨δ_t, δ̄⟩)`` by an explicit double
backward, clipped to ``0.1 ‖∇_θ ℓ_t‖`` the same way and added to the head's own gradient. Then the
absent-task rule, a task whose loss does not reach ``z``, and the refusals."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy.optimize import least_squares
from torch import nn

import mtlopt
from mtlopt.autogram import engine_serves


class Net(nn.Module):
    def __init__(self, tasks: int = 3) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(3, 5), nn.Tanh())
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1)) for _ in range(tasks)
        )
        self.side = nn.Linear(5, 1)  # a task that reads the encoder's first layer, not z

    def forward_losses(self, x, y, side: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The representation z and the task losses."""
        z = self.encoder(x)
        out = [((h(z).squeeze(-1) - y[:, t]) ** 2).mean() for t, h in enumerate(self.heads)]
        if side:
            out.append(((self.side(self.encoder[0](x)).squeeze(-1) - y[:, 0]) ** 2).mean())
        return z, out

    def losses(self, x, y, side: bool = False) -> list[torch.Tensor]:
        return self.forward_losses(x, y, side)[1]

    def task_parameters(self, task: int) -> list[nn.Parameter]:
        module = self.heads[task] if task < len(self.heads) else self.side
        return list(module.parameters())


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    scales = torch.tensor([1.0, 10.0, 0.1], dtype=torch.float64)
    return x, torch.randn(8, 3, generator=g, dtype=torch.float64) * scales


def _norm(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]).norm()


def _authors_code(model: Net, x, y, tasks, side=False, lam=1.0, clip=0.1, times=True, max_norm=1.0):
    """The authors' ConsMTL step written out; returns α, the task weights of the shared update
    (×T, clipped), the shared update, each task's head gradients and each head's clipping
    factor."""
    z, every = model.forward_losses(x, y, side)
    losses = [every[t] for t in tasks]
    shared = list(model.encoder.parameters())
    jac = torch.stack([
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)])
        for loss in losses
    ])  # fmt: skip
    gram = (jac @ jac.T).numpy()
    t = len(tasks)
    solution = least_squares(
        lambda a: gram @ a - np.power(1 / a, 0.5), np.ones(t) / t, bounds=(0, np.inf),
        xtol=1e-15, ftol=1e-15, gtol=1e-15,
    )  # fmt: skip
    alpha = solution.x
    assert np.abs(gram @ alpha - alpha**-0.5).max() < 1e-9 * np.abs(alpha**-0.5).max()
    weights = (t if times else 1) * alpha
    update = torch.from_numpy(weights) @ jac
    if max_norm is not None:
        factor = min(1.0, max_norm / (float(update.norm()) + 1e-6))
        weights, update = weights * factor, update * factor
    deltas = [
        torch.autograd.grad(loss, z, retain_graph=True, create_graph=True, allow_unused=True)[0]
        for loss in losses
    ]
    target = sum(alpha[i] * d for i, d in enumerate(deltas) if d is not None).detach()
    heads, factors = {}, {}
    for i, task in enumerate(tasks):
        theta = model.task_parameters(task)
        g1 = torch.autograd.grad(losses[i], theta, retain_graph=True)
        if deltas[i] is None:
            heads[task] = list(g1)
            continue
        extra = -lam * torch.dot(deltas[i].reshape(-1), target.reshape(-1))
        g2 = torch.autograd.grad(extra, theta, retain_graph=True)
        factor = min(1.0, clip * float(_norm(g1)) / (float(_norm(g2)) + 1e-6))
        factors[task] = factor
        heads[task] = [a + factor * b for a, b in zip(g1, g2, strict=True)]
    return alpha, weights, update, heads, factors


def _ours(model: Net, x, y, side=False, select=list, **kwargs):
    """One step of the optimizer (learning rate 0) on the losses, ``select``-ed."""
    opt = mtlopt.MTLOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), "consmtl", representation=model.encoder,
        **kwargs,
    )  # fmt: skip
    info = opt.step(select(model.losses(x, y, side)))
    shared = torch.cat([p.grad.reshape(-1) for p in model.encoder.parameters()])
    return info, shared


@pytest.mark.parametrize(
    "options",
    [{}, {"consistency_weight": 1e-4}, {"times_tasks": False, "max_norm": None}],
    ids=["code defaults", "head extra not clipped", "paper-style update"],
)
def test_gradients_equal_the_authors_code_written_out(options):
    torch.manual_seed(0)
    model = Net().double()
    reference = copy.deepcopy(model)
    x, y = _batch()
    lam = options.get("consistency_weight", 1.0)
    times = options.get("times_tasks", True)
    max_norm = options.get("max_norm", 1.0)
    alpha, weights, update, heads, factors = _authors_code(
        reference, x, y, [0, 1, 2], lam=lam, times=times, max_norm=max_norm
    )
    info, shared = _ours(model, x, y, **options)

    torch.testing.assert_close(info.weights, torch.from_numpy(weights), rtol=1e-5, atol=0)
    torch.testing.assert_close(shared, update, rtol=1e-5, atol=1e-12)
    for task in range(3):
        got = [p.grad for p in model.heads[task].parameters()]
        for a, b in zip(got, heads[task], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)
    # The checks can fail: the extra term is there, clipped in the defaults, not with a tiny λ.
    raw = [torch.autograd.grad(loss, model.task_parameters(t)) for t, loss in
           enumerate(model.losses(x, y))]  # fmt: skip
    assert all(float(_norm(heads[t]) - _norm(raw[t])) != 0 for t in range(3))
    if lam == 1.0:
        assert all(f < 1 for f in factors.values())
    else:
        assert all(f == 1 for f in factors.values())
    if max_norm is not None:
        assert float((3 * torch.from_numpy(alpha) @ _jacobian(reference, x, y)).norm()) > 1.5


def _jacobian(model: Net, x, y) -> torch.Tensor:
    shared = list(model.encoder.parameters())
    return torch.stack([
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)])
        for loss in model.losses(x, y)
    ])  # fmt: skip


def test_an_absent_task_is_left_out_of_the_bargain_and_its_head_gets_nothing():
    torch.manual_seed(0)
    model = Net().double()
    reference = copy.deepcopy(model)
    x, y = _batch()
    _, weights, update, heads, _ = _authors_code(reference, x, y, [0, 2])
    info, shared = _ours(model, x, y, select=lambda out: {"a": out[0], "b": None, "c": out[2]})
    torch.testing.assert_close(shared, update, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(info.weights[[0, 2]], torch.from_numpy(weights), rtol=1e-5, atol=0)
    assert np.isnan(float(info.weights[1]))
    for task in (0, 2):
        for a, b in zip(model.heads[task].parameters(), heads[task], strict=True):
            torch.testing.assert_close(a.grad, b, rtol=1e-7, atol=1e-12)
    assert all(p.grad is None for p in model.heads[1].parameters())


def test_a_task_that_does_not_reach_the_representation_gets_no_extra_head_gradient():
    torch.manual_seed(0)
    model = Net().double()
    reference = copy.deepcopy(model)
    x, y = _batch()
    _, weights, update, heads, factors = _authors_code(reference, x, y, [0, 1, 2, 3], side=True)
    assert set(factors) == {0, 1, 2}  # the side task has no δ
    info, shared = _ours(model, x, y, side=True)
    torch.testing.assert_close(shared, update, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(info.weights, torch.from_numpy(weights), rtol=1e-5, atol=0)
    for task in range(4):
        for a, b in zip(model.task_parameters(task), heads[task], strict=True):
            torch.testing.assert_close(a.grad, b, rtol=1e-7, atol=1e-12)


def test_the_gramian_engine_and_representation_mode_do_not_take_it():
    model = Net().double()
    assert not engine_serves(mtlopt.create("consmtl"))
    with pytest.raises(ValueError, match="engine='jacobian'"):
        mtlopt.MTLOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), "consmtl", engine="gramian",
            representation=model.encoder,
        )  # fmt: skip
    opt = mtlopt.MTLOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), "consmtl", representation=model.encoder
    )
    x, y = _batch()
    with pytest.raises(ValueError, match="does not support representation mode"):
        opt.backward(model.losses(x, y), features=model.encoder(x))


def test_the_default_engine_takes_the_jacobian_path():
    torch.manual_seed(0)
    model = Net().double()
    opt = mtlopt.MTLOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), "consmtl", representation=model.encoder
    )
    x, y = _batch()
    assert opt.step(model.losses(x, y)).engine == "jacobian"


def test_gradient_accumulation_warns_and_trains():
    torch.manual_seed(0)
    model = Net().double()
    opt = mtlopt.MTLOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.01), "consmtl", representation=model.encoder
    )
    x, y = _batch()
    opt.backward(model.losses(x[:4], y[:4]))
    with pytest.warns(UserWarning, match="gradient accumulation"):
        opt.backward(model.losses(x[4:], y[4:]))
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_grad_scaler_run_equals_the_plain_run():
    """The extra head gradients are taken unscaled (δ_t before the loss scaling, the clip against
    the unscaled head gradient) and written scaled, so the scaler's unscaling gives the plain
    run's gradients."""
    torch.manual_seed(0)
    plain = Net().double()
    scaled = copy.deepcopy(plain)
    x, y = _batch()
    _ours(plain, x, y)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    opt = mtlopt.MTLOptimizer(
        torch.optim.SGD(scaled.parameters(), lr=0.0), "consmtl", representation=scaled.encoder,
        scaler=scaler,
    )  # fmt: skip
    opt.backward(scaled.losses(x, y))
    scaler.unscale_(opt)
    for p, q in zip(plain.parameters(), scaled.parameters(), strict=True):
        assert (p.grad is None and q.grad is None) or torch.allclose(p.grad, q.grad, rtol=1e-12)


def test_sparse_training_keeps_the_heads_extra_gradients():
    """``sparse_mtl`` masks the shared update only: with density 1 it is consmtl itself."""
    torch.manual_seed(0)
    model = Net().double()
    twin = copy.deepcopy(model)
    x, y = _batch()
    _ours(model, x, y)
    opt = mtlopt.MTLOptimizer(
        torch.optim.SGD(twin.parameters(), lr=0.0), "sparse_mtl", density=1.0,
        base=mtlopt.create("consmtl", representation=twin.encoder),
    )  # fmt: skip
    opt.step(twin.losses(x, y))
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert (p.grad is None and q.grad is None) or torch.allclose(p.grad, q.grad, rtol=1e-12)
