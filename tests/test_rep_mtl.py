"""Rep-MTL (ICCV 2025, no public code): the parameter gradients equal those of the paper's
objective Σ L_t + λ_TSR·TSR + λ_CSA·CSA written out independently with loops over tasks, samples
and positions (our reading of the paper: see the strategy's docstring), on a [B, D] and a token
[B, N, C] representation; the regulariser reaches the heads (double backward); refusals."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import mtlopt


class TokenNet(nn.Module):
    def __init__(self, tokens: bool) -> None:
        super().__init__()
        self.tokens = tokens
        self.encoder = nn.Sequential(nn.Linear(3, 5), nn.Tanh())
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1))
                                   for _ in range(3))

    def forward(self, x):
        z = self.encoder(x)  # [B, D] or [B, N, C]
        if self.tokens:
            return z, [h(z).mean(dim=(1, 2)) for h in self.heads]
        return z, [h(z).squeeze(-1) for h in self.heads]


def _reference_objective(losses, z, tsr, csa, tau, tokens):
    """Σ L + tsr · mean_{t,b} H(p_tb) + csa · mean_{t≠u} mean_b InfoNCE (on the samples' whole
    signed saliencies), with plain loops."""
    sal = [torch.autograd.grad(loss, z, create_graph=True)[0] for loss in losses]
    maps = []
    for s in sal:
        per_sample = []
        for b in range(z.shape[0]):
            if tokens:
                per_sample.append([s[b, n].abs().sum() for n in range(z.shape[1])])
            else:
                per_sample.append([s[b, n].abs() for n in range(z.shape[1])])
        maps.append(per_sample)
    t_count, b_count, n_count = len(maps), z.shape[0], z.shape[1]
    entropy = 0.0
    for t in range(t_count):
        for b in range(b_count):
            total = sum(maps[t][b])
            for n in range(n_count):
                p = maps[t][b][n] / total
                entropy = entropy - p * torch.log(p)
    entropy = entropy / (t_count * b_count)

    def cos(u, v):
        dot = sum(a * c for a, c in zip(u, v, strict=True))
        return dot / (math.sqrt(1e-300) + torch.sqrt(sum(a * a for a in u))
                      * torch.sqrt(sum(c * c for c in v)))

    nce, pairs = 0.0, 0
    for t in range(t_count):
        for u in range(t_count):
            if t == u:
                continue
            pairs += 1
            for b in range(b_count):
                scores = torch.stack(
                    [cos(list(sal[t][b].reshape(-1)), list(sal[u][c].reshape(-1))) / tau
                     for c in range(b_count)]
                )
                nce = nce - torch.log_softmax(scores, dim=0)[b] / b_count
    return sum(losses) + tsr * entropy + csa * nce / pairs


@pytest.mark.parametrize("tokens", [False, True])
def test_gradients_equal_the_papers_objective_written_out(tokens):
    torch.manual_seed(0)
    model = TokenNet(tokens).double()
    g = torch.Generator().manual_seed(1)
    shape = (4, 3, 3) if tokens else (4, 3)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    y = torch.randn(4, 3, generator=g, dtype=torch.float64)
    opt = mtlopt.MTLOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), "rep_mtl", representation=model.encoder,
        tsr_weight=0.3, csa_weight=0.7, temperature=0.5,
    )
    _, outs = model(x)
    opt.backward([((o - y[:, i]) ** 2).mean() for i, o in enumerate(outs)])
    ours = [p.grad.clone() for p in model.parameters()]

    z, outs = model(x)
    losses = [((o - y[:, i]) ** 2).mean() for i, o in enumerate(outs)]
    objective = _reference_objective(losses, z, 0.3, 0.7, 0.5, tokens)
    expected = torch.autograd.grad(objective, list(model.parameters()))
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_the_regulariser_reaches_the_heads_through_a_double_backward():
    torch.manual_seed(0)
    model = TokenNet(False)
    x, y = torch.randn(6, 3), torch.randn(6, 3)
    grads = {}
    for weight in (0.0, 1.0):
        model.zero_grad()
        opt = mtlopt.MTLOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), "rep_mtl", representation=model.encoder,
            tsr_weight=weight, csa_weight=weight,
        )
        _, outs = model(x)
        opt.backward([((o - y[:, i]) ** 2).mean() for i, o in enumerate(outs)])
        grads[weight] = model.heads[0][0].weight.grad.clone()
    assert not torch.allclose(grads[0.0], grads[1.0])


def test_without_a_representation_it_refuses_and_changes_nothing():
    model = TokenNet(False)
    opt = mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "rep_mtl")
    _, outs = model(torch.randn(4, 3))
    with pytest.raises(TypeError, match=r"representation=model\.encoder"):
        opt.step([o.mean() for o in outs])
    assert all(p.grad is None for p in model.parameters())
    assert opt.task_names is None
