"""Recon (ICLR 2023): the branched layers are those a brute-force count of per-layer task-gradient
cosines below S picks on a small model; the surgery keeps the function; after it each task's copy
receives only its task's gradient; a checkpoint re-applies the surgery; what is missing is
refused."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mtlopt


class StreamNet(nn.Module):
    """Four shared linear layers, three heads that read their stream with task_view."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
            nn.Linear(8, 6),
        )
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(3))

    def forward(self, x):
        z = self.trunk(x)
        return [h(mtlopt.task_view(z, i)).squeeze(-1) for i, h in enumerate(self.heads)]


def _batch(step: int):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 5, generator=g)
    y = torch.stack([x[:, 0], -x[:, 0] + 0.3 * x[:, 1], x[:, 2] * x[:, 3]], dim=1)
    return x, y + 0.1 * torch.randn(16, 3, generator=g)


def _losses(model, batch):
    x, y = batch
    return [((p - y[:, i]) ** 2).mean() for i, p in enumerate(model(x))]


def _brute_force_scores(model, steps, threshold):
    """Train with plain SGD on Σ L; per step, per linear layer, per pair i < j of tasks, count
    F.cosine_similarity(g_i, g_j) < S with each layer's gradients taken one by one."""
    layers = [m for m in model.trunk if isinstance(m, nn.Linear)]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scores = [0] * len(layers)
    for step in range(steps):
        losses = _losses(model, _batch(step))
        for index, layer in enumerate(layers):
            grads = []
            for loss in losses:
                gs = torch.autograd.grad(loss, list(layer.parameters()), retain_graph=True)
                grads.append(torch.cat([g.reshape(-1) for g in gs]).double())
            for i in range(3):
                for j in range(i + 1, 3):
                    if F.cosine_similarity(grads[i], grads[j], dim=0) < threshold:
                        scores[index] += 1
        opt.zero_grad()
        sum(losses).backward()
        opt.step()
    return scores


def _recon(model, **kwargs):
    strategy = mtlopt.create("recon", layers=model.trunk, **kwargs)
    return mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), strategy), strategy


def test_the_branched_layers_match_a_brute_force_count():
    torch.manual_seed(0)
    model = StreamNet()
    twin = copy.deepcopy(model)
    expected = _brute_force_scores(twin, steps=6, threshold=0.1)
    opt, recon = _recon(model, threshold=0.1, top_k=2, analysis_steps=6)
    for step in range(6):
        opt.zero_grad()
        opt.step(lambda step=step: _losses(model, _batch(step)))
    assert recon.scores.tolist() == expected
    order = sorted(range(4), key=lambda i: (-expected[i], i))
    assert recon.chosen == sorted(order[:2])
    assert len(expected) == 4 and max(expected) > 0


def test_after_surgery_each_copy_gets_only_its_tasks_gradient_and_the_function_is_kept():
    torch.manual_seed(0)
    model = StreamNet()
    opt, recon = _recon(model, threshold=1.0, top_k=2, analysis_steps=1)  # every pair conflicts
    x, y = _batch(0)
    opt.step(_losses(model, (x, y)))
    assert recon.chosen == [0, 1]  # all tie: the earliest two
    before = [o.detach() for o in model(x)]
    reference = copy.deepcopy(model)  # the branched model, copied: its copies are exact
    after = model(x)
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b)
    owned = recon.task_parameters()
    assert [len(o) for o in owned] == [4, 4, 4]
    opt.zero_grad()
    opt.backward(_losses(model, (x, y)))
    losses = _losses(reference, (x, y))
    for task, params in enumerate(owned):
        for other, loss in enumerate(losses):
            ref_params = [dict(reference.named_parameters())[n] for n in _names(model, params)]
            grads = torch.autograd.grad(loss, ref_params, retain_graph=True, allow_unused=True)
            if other == task:
                for p, g in zip(params, grads, strict=True):
                    torch.testing.assert_close(p.grad, g)
            else:  # connected through the streams' concatenation, numerically zero
                assert all(g is None or not g.any() for g in grads)


def _names(model, params):
    ids = {id(p): n for n, p in model.named_parameters()}
    return [ids[id(p)] for p in params]


def test_a_checkpoint_reapplies_the_surgery():
    torch.manual_seed(0)
    model = StreamNet()
    opt, _ = _recon(model, threshold=1.0, top_k=1, analysis_steps=1)
    opt.step(_losses(model, _batch(0)))
    opt.step(_losses(model, _batch(1)))
    fresh = StreamNet()
    fresh_opt, fresh_recon = _recon(fresh, threshold=1.0, top_k=1, analysis_steps=1)
    fresh_opt.load_state_dict(opt.state_dict())
    fresh.load_state_dict(model.state_dict())
    x, _ = _batch(2)
    for a, b in zip(model(x), fresh(x), strict=True):
        torch.testing.assert_close(a, b)
    assert fresh_recon.chosen == [0]


def test_heads_without_task_view_and_missing_layers_are_refused():
    class Plain(StreamNet):
        def forward(self, x):
            z = self.trunk(x)
            return [h(z).squeeze(-1) for h in self.heads]

    model = Plain()
    opt, _ = _recon(model, threshold=1.0, top_k=1, analysis_steps=1)
    opt.step(_losses(model, _batch(0)))
    with pytest.raises((RuntimeError, ValueError)):
        opt.step(_losses(model, _batch(1)))
    bare = mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "recon")
    with pytest.raises(TypeError, match=r"layers=model\.trunk"):
        bare.step(_losses(StreamNet(), _batch(0)))
