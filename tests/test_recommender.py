"""The recommender setup: sparse embeddings shared by every task, SparseAdam for them and Adam for
the rest, under one MTLOptimizer."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from strategies_under_test import gradient_strategies, make
from torch import nn

import mtlopt

GRADIENT = gradient_strategies()


class SharedBottom(nn.Module):
    """User and item embeddings (sparse gradients) and a bottom MLP shared by the tasks, a tower
    per task (click, conversion, rating)."""

    def __init__(self, users: int = 50, items: int = 40, dim: int = 8, tasks: int = 3) -> None:
        super().__init__()
        self.users = nn.Embedding(users, dim, sparse=True)
        self.items = nn.Embedding(items, dim, sparse=True)
        self.bottom = nn.Sequential(nn.Linear(2 * dim, 16), nn.ReLU())
        self.towers = nn.ModuleList(nn.Linear(16, 1) for _ in range(tasks))

    def forward(self, user, item):
        h = self.bottom(torch.cat([self.users(user), self.items(item)], dim=-1))
        return [tower(h).squeeze(-1) for tower in self.towers]

    def embeddings(self):
        return [*self.users.parameters(), *self.items.parameters()]

    def dense(self):
        return [*self.bottom.parameters(), *self.towers.parameters()]


def _batch(seed=0, n=32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 50, (n,), generator=g), torch.randint(0, 40, (n,), generator=g),
            torch.randn(n, 3, generator=g))


def _losses(model, user, item, y):
    return {name: ((p - y[:, i]) ** 2).mean()
            for i, (name, p) in enumerate(zip(("click", "convert", "rate"), model(user, item),
                                              strict=True))}


@pytest.mark.parametrize("name", GRADIENT)
def test_sparse_embeddings_get_the_task_gradients_weighted_by_the_strategy(name):
    torch.manual_seed(0)
    model = SharedBottom()
    opt = mtlopt.MTLOptimizer(
        [torch.optim.SparseAdam(model.embeddings(), lr=1e-2),
         torch.optim.Adam(model.dense(), lr=1e-2)],
        make(name) if name in {"pcgrad", "gradvac", "graddrop"} else name,
    )
    user, item, y = _batch()
    reference, strategy = copy.deepcopy(model), copy.deepcopy(opt.strategy)
    losses = list(_losses(reference, user, item, y).values())
    dense = list(reference.bottom.parameters())
    jacobian = torch.stack([torch.cat([g.reshape(-1) for g in
                                       torch.autograd.grad(loss, dense, retain_graph=True)])
                            for loss in losses])
    combined = strategy.combine(jacobian, torch.stack(losses).detach().double())
    weights = torch.ones(3) if combined.weights is None else combined.weights.float()
    embedding_grads = [torch.autograd.grad(loss, reference.users.weight, retain_graph=True)[0]
                       .to_dense() for loss in losses]
    expected_users = sum(w * g for w, g in zip(weights, embedding_grads, strict=True))

    opt.zero_grad()
    opt.step(_losses(model, user, item, y))
    assert model.users.weight.grad.is_sparse
    torch.testing.assert_close(model.users.weight.grad.to_dense(), expected_users)
    got = torch.cat([p.grad.reshape(-1) for p in model.bottom.parameters()])
    torch.testing.assert_close(got, combined.direction)


@pytest.mark.parametrize("name", ["ew", "uw", "pcgrad", "mgda", "famo"])
def test_the_recommender_trains_and_resumes(name):
    torch.manual_seed(0)
    model = SharedBottom()

    def wrap(m):
        return mtlopt.MTLOptimizer(
            [torch.optim.SparseAdam(m.embeddings(), lr=1e-2), torch.optim.Adam(m.dense(), lr=1e-2)],
            make(name) if name == "pcgrad" else name,
        )

    opt = wrap(model)
    for step in range(5):
        user, item, y = _batch(step)
        opt.zero_grad()
        # A batch without rating labels leaves that task out.
        opt.step(lambda u=user, i=item, y=y, s=step: {**_losses(model, u, i, y),
                                                       **({"rate": None} if s % 2 else {})})
    twin = copy.deepcopy(model)
    twin_opt = wrap(twin)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)  # a real checkpoint: no state tensor shared with opt
    buffer.seek(0)
    twin_opt.load_state_dict(torch.load(buffer))
    for m, o in ((model, opt), (twin, twin_opt)):
        user, item, y = _batch(9)
        o.zero_grad()
        o.step(lambda m=m, u=user, i=item, y=y: _losses(m, u, i, y))
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_parameter_given_to_two_chained_optimizers_is_refused():
    model = SharedBottom()
    with pytest.raises(ValueError, match="exactly one"):
        mtlopt.OptimizerChain(torch.optim.SGD(model.dense(), lr=0.1),
                              torch.optim.Adam(model.dense(), lr=0.1))
