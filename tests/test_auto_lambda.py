"""Auto-λ (TMLR 2022): the task weights after one step equal an independent re-computation of the
paper's update (virtual SGD step, validation gradient d at θ', finite difference of the training
losses at θ ± εd, ε = 0.01/‖d‖, λ.grad = −α h, Adam on λ); the model is trained on Σ λ_new L; the
exact hypergradient agrees with the finite difference; what is missing is refused, unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mtlopt


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.BatchNorm1d(6))
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(3))

    def forward(self, x):
        z = self.trunk(x)
        return [h(z).squeeze(-1) for h in self.heads]


def _data(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(12, 4, generator=g), torch.randn(12, 3, generator=g)


def _losses(model, batch):
    x, y = batch
    return {name: ((p - y[:, i]) ** 2).mean() for i, (name, p) in
            enumerate(zip(("a", "b", "c"), model(x), strict=True))}


def _expected_weights(model, train, val, meta, adam, lr, momentum_buffers, primary):
    """The paper's λ update (``meta``: λ as a leaf stepped by ``adam``), written out with
    torch.func.functional_call on copies of the parameters."""
    names = [n for n, _ in model.named_parameters()]
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    lam = meta.detach().clone()

    def losses_at(params, batch):
        x, y = batch
        out = torch.func.functional_call(model, ({**params, **copy.deepcopy(buffers)},), (x,))
        return torch.stack([((p - y[:, i]) ** 2).mean() for i, p in enumerate(out)])

    leaves = {n: t.clone().requires_grad_(True) for n, t in theta.items()}
    g = torch.autograd.grad((lam * losses_at(leaves, train)).sum(), [leaves[n] for n in names])
    prime = {
        n: (theta[n] - lr * (gi + momentum_buffers.get(n, 0.0))).requires_grad_(True)
        for n, gi in zip(names, g, strict=True)
    }
    val_losses = losses_at(prime, val)
    d = torch.autograd.grad(val_losses[primary].sum(), [prime[n] for n in names])
    norm = torch.cat([di.reshape(-1) for di in d]).norm()
    eps = 0.01 / norm
    plus = losses_at({n: theta[n] + eps * di for n, di in zip(names, d, strict=True)}, train)
    minus = losses_at({n: theta[n] - eps * di for n, di in zip(names, d, strict=True)}, train)
    meta.grad = -lr * (plus - minus) / (2 * eps)
    adam.step()
    return meta.detach().clone()


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_the_weights_follow_the_papers_update(momentum):
    torch.manual_seed(0)
    model = Net()
    train, val = _data(0), _data(1)
    inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum)
    opt = mtlopt.MTLOptimizer(
        inner, "auto_lambda", model=model, primary=["a", "c"],
        validation=lambda: _losses(model, val), weight_lr=0.01,
    )
    meta = torch.full((3,), 0.1, requires_grad=True)
    adam = torch.optim.Adam([meta], lr=0.01)
    for _ in range(3):
        buffers = {
            n: momentum * inner.state[p]["momentum_buffer"]
            for n, p in model.named_parameters()
            if "momentum_buffer" in inner.state.get(p, {})
        }
        expected = _expected_weights(model, train, val, meta, adam, 0.05, buffers, [0, 2])
        opt.zero_grad()
        info = opt.step(lambda: _losses(model, train))
        torch.testing.assert_close(info.weights.float(), expected, rtol=1e-4, atol=1e-6)
    state = opt.state_dict()["strategy"]
    assert state["weights"] is not None


def test_the_step_trains_on_the_new_weights_and_restores_everything_else():
    torch.manual_seed(0)
    model = Net()
    twin = copy.deepcopy(model)
    train, val = _data(0), _data(1)
    opt = mtlopt.MTLOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05), "auto_lambda", model=model,
        validation=lambda: _losses(model, val), weight_lr=0.01,
    )
    info = opt.step(lambda: _losses(model, train))
    # The twin takes the plain step on Σ λ_new L: one forward of the training batch (its
    # BatchNorm statistics move once, as the model's must).
    total = sum(w * loss for w, loss in zip(info.weights, _losses(twin, train).values(), strict=True))
    total.backward()
    with torch.no_grad():
        for p in twin.parameters():
            p -= 0.05 * p.grad
    for (n, p), q in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, msg=n)


def test_the_exact_hypergradient_agrees_with_the_finite_difference():
    """−α⟨∇L_t, d⟩ (T backward) and the paper's central difference of L_t at θ ± εd agree to the
    difference's O(ε²) error."""
    from mtlopt.bilevel import within_step

    torch.manual_seed(0)
    model = Net()
    train, val = _data(0), _data(1)
    found = {}
    for hyper in ("finite_difference", "exact"):
        strategy = mtlopt.create(
            "auto_lambda", model=model, validation=lambda: _losses(model, val), hypergradient=hyper
        )
        strategy.bind_optimizer(torch.optim.SGD(model.parameters(), lr=0.05))
        losses = torch.stack(list(_losses(model, train).values()))
        with within_step(lambda: _losses(model, train)):
            found[hyper] = strategy._hypergradient(losses, [0.1, 0.2, 0.3])
    assert abs(found["exact"]).max() > 1e-4
    assert abs(found["exact"] - found["finite_difference"]).max() < 1e-3 * abs(found["exact"]).max()


def test_what_is_missing_is_refused_and_nothing_changes():
    torch.manual_seed(0)
    model = Net()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train, val = _data(0), _data(1)
    bare = mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), "auto_lambda")
    with pytest.raises(TypeError, match="needs model and validation"):
        bare.step(lambda: _losses(model, train))
    opt = mtlopt.MTLOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05), "auto_lambda", model=model,
        validation=lambda: _losses(model, val),
    )
    with pytest.raises(TypeError, match="step with a closure"):
        opt.step(_losses(model, train))
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.named_parameters():  # (the closure's own forward moves BatchNorm's stats)
        assert torch.equal(v, before[k])
    assert opt.task_names is None
