"""DTME's statistics count real tokens only (issue 15): padding excluded by the blocks' masks from
the covariance and the conflict counts, all-zero-gradient tokens excluded where there is no mask,
and one counted-pair rule for every space. Checked against a brute-force recomputation."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import mtlopt
from mtlopt.tokens import ConflictCounts, TokenSpace, TokenSpaceAnalysis, analyze_token_conflicts
from mtlopt.tokens.space import split_rank


class PaddedBlock(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.mlp = nn.Linear(dim, dim)

    def forward(self, x, padding):
        h = self.norm(x)
        x = x + self.attn(h, h, h, key_padding_mask=padding, need_weights=False)[0]
        return x + self.mlp(x)


class PaddedModel(nn.Module):
    """Padded sequences; heads pool over real tokens only (padding gets no gradient)."""

    def __init__(self, tasks=3, dim=8):
        super().__init__()
        self.embed = nn.Linear(3, dim)
        self.blocks = nn.ModuleList(PaddedBlock(dim) for _ in range(2))
        self.heads = nn.ModuleList(nn.Linear(dim, 1) for _ in range(tasks))

    def forward(self, x, padding):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, padding)
        keep = (~padding).unsqueeze(-1).float()
        return [
            head((mtlopt.task_view(h, i) * keep).sum(1) / keep.sum(1)).squeeze(-1)
            for i, head in enumerate(self.heads)
        ]


def _batches(n=3):
    out = []
    for s in range(n):
        g = torch.Generator().manual_seed(s)
        x = torch.randn(6, 7, 3, generator=g)
        padding = torch.zeros(6, 7, dtype=torch.bool)
        padding[:, 4:] = True  # 3 of 7 tokens are padding
        padding[0, 6] = False
        y = torch.randn(6, 3, generator=g)
        out.append((x, padding, y))
    return out


def _losses(model, b):
    x, padding, y = b
    return [((o - y[:, i]) ** 2).mean() for i, o in enumerate(model(x, padding))]


def _brute_force(model, batches, r=100.0):
    """Token covariance and conflict rates over real tokens, recomputed from scratch."""
    inputs = {}
    hooks = [
        block.register_forward_pre_hook(lambda m, a, d=d: inputs.__setitem__(d, a[0]))
        for d, block in enumerate(model.blocks)
    ]
    covariances = [np.zeros((8, 8)), np.zeros((8, 8))]
    with torch.no_grad():
        for b in batches:
            model(b[0], b[1])
            real = ~b[1]
            for d in range(2):
                tokens = inputs[d][real].double().numpy()  # [real tokens, p]
                covariances[d] += tokens.T @ tokens
    rates = []
    for d in range(2):
        lam, vectors = np.linalg.eigh(covariances[d])
        order = np.argsort(lam)[::-1]
        lam, vectors = lam[order], vectors[:, order]
        m = split_rank(lam, r)
        conflicts = {"range": 0, "null": 0}
        counted = {"range": 0, "null": 0}
        for b in batches:
            for hook in hooks:
                hook.remove()
            taps = [
                block.register_forward_pre_hook(
                    lambda mod, a: (
                        None if a[0].requires_grad else (a[0].detach().requires_grad_(True), *a[1:])
                    )
                )
                for block in model.blocks
            ]
            grabbed = {}
            grab = [
                block.register_forward_pre_hook(lambda mod, a, d=d, g=grabbed: g.__setitem__(d, a[0]))
                for d, block in enumerate(model.blocks)
            ]
            losses = _losses(model, b)
            grads = [torch.autograd.grad(loss, grabbed[d], retain_graph=True)[0] for loss in losses]
            for h in taps + grab:
                h.remove()
            real = ~b[1]
            for space, basis in (("range", vectors[:, :m]), ("null", vectors[:, m:])):
                coords = [g[real].double().numpy() @ basis for g in grads]
                for i in range(3):
                    for j in range(i + 1, 3):
                        for a, c in zip(coords[i], coords[j], strict=True):
                            if np.any(a != 0) and np.any(c != 0):
                                counted[space] += 1
                                conflicts[space] += float(a @ c) <= 0
        rates.append(
            tuple(conflicts[s] / counted[s] if counted[s] else 0.0 for s in ("range", "null"))
        )
    return covariances, rates


def test_covariance_and_rates_count_real_tokens_only():
    torch.manual_seed(0)
    model = PaddedModel()
    batches = _batches()
    report = analyze_token_conflicts(model, batches, lambda b: _losses(model, b), num_tasks=3)
    covariances, rates = _brute_force(model, batches)
    for d in range(2):
        assert report.range_rates[d] == pytest_approx(rates[d][0])
        assert report.null_rates[d] == pytest_approx(rates[d][1])
    assert report.tokens_seen == [float(sum(int((~b[1]).sum()) for b in batches))] * 2
    analysis = TokenSpaceAnalysis(model, 3)
    with torch.no_grad():
        for b in batches:
            model(b[0], b[1])
            analysis.observe_tokens()
    analysis.close()
    for d in range(2):
        np.testing.assert_allclose(analysis.covariance.sums[d].numpy(), covariances[d], rtol=1e-10)


def pytest_approx(value):
    import pytest

    return pytest.approx(value, abs=1e-12)


def test_tokens_no_task_reaches_are_not_conflicts_without_a_mask():
    """No mask: a token whose task gradients are all zero is not counted (0 ≤ 0 is no conflict)."""
    space = TokenSpace.from_covariance(np.diag([4.0, 1.0]), r=1.0)
    g1 = torch.tensor([[[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]])
    g2 = torch.tensor([[[-1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]])
    counts = ConflictCounts(1, 2)
    counts.add([space], [[g1], [g2]])
    range_rate, null_rate = counts.rates()
    assert counts.tokens[0] == 1
    assert range_rate[0] == 1.0 and null_rate[0] == 0.0


def test_dict_losses_in_the_diagnostic():
    """Was: an autograd AssertionError (the dict's keys were taken as losses)."""
    torch.manual_seed(0)
    model = PaddedModel()
    batches = _batches(2)
    as_list = analyze_token_conflicts(model, batches, lambda b: _losses(model, b), num_tasks=3)
    as_dict = analyze_token_conflicts(
        model, batches, lambda b: dict(zip("abc", _losses(model, b), strict=True)), num_tasks=3
    )
    assert as_dict.range_rates == as_list.range_rates
