"""Representation mode: per-task gradients with respect to shared features (MGDA-UB style)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import SharedTrunkNet, make_batch

import mtlopt


def _forward(model, x, y):
    features = model.trunk(x)
    losses = [
        ((head(features).squeeze(-1) - y[:, i]) ** 2).mean() for i, head in enumerate(model.heads)
    ]
    return features, losses


@pytest.mark.parametrize("name", ["mgda", "imtl_g", "aligned_mtl", "pcgrad"])
def test_trunk_gets_the_combination_of_feature_gradients(name):
    model = SharedTrunkNet()
    reference = copy.deepcopy(model)
    x, y = make_batch()

    features, losses = _forward(reference, x, y)
    feature_grads = torch.stack(
        [torch.autograd.grad(loss, features, retain_graph=True)[0].reshape(-1) for loss in losses]
    )
    strategy = mtlopt.create(name, seed=0) if name == "pcgrad" else mtlopt.create(name)
    direction = strategy.aggregate(feature_grads).view_as(features)
    expected_trunk = torch.autograd.grad(
        features, list(reference.trunk.parameters()), direction, retain_graph=True
    )
    expected_heads = [
        torch.autograd.grad(loss, list(head.parameters()), retain_graph=True)
        for loss, head in zip(losses, reference.heads, strict=True)
    ]

    opt = mtlopt.MTLOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        name,
        **({"seed": 0} if name == "pcgrad" else {}),
    )
    features, losses = _forward(model, x, y)
    opt.backward(losses, features=features)
    for p, g in zip(model.trunk.parameters(), expected_trunk, strict=True):
        torch.testing.assert_close(p.grad, g)
    for head, grads in zip(model.heads, expected_heads, strict=True):
        for p, g in zip(head.parameters(), grads, strict=True):
            torch.testing.assert_close(p.grad, g)


def test_representation_mode_is_refused_where_it_would_be_silently_wrong():
    model = SharedTrunkNet()
    x, y = make_batch()
    features, losses = _forward(model, x, y)
    with pytest.raises(ValueError, match="loss strategy"):
        mtlopt.MTLOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), "uw", num_tasks=2
        ).backward(losses, features=features)
    with pytest.raises(ValueError, match="does not support representation"):
        mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "db_mtl").backward(
            losses, features=features
        )
    with pytest.raises(ValueError, match="requires grad"):
        mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "mgda").backward(
            losses, features=features.detach()
        )


def test_representation_mode_trains():
    model = SharedTrunkNet()
    x, y = make_batch(n=64)
    opt = mtlopt.MTLOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), "mgda")
    first = None
    for _ in range(60):
        opt.zero_grad()
        features, losses = _forward(model, x, y)
        opt.backward(losses, features=features)
        opt.step()
        first = first or [float(loss.detach()) for loss in losses]
    _, losses = _forward(model, x, y)
    assert all(float(loss.detach()) < f for loss, f in zip(losses, first, strict=True))
