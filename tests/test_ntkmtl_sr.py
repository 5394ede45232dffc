"""NTKMTL-SR (NeurIPS 2025): the parameter gradients equal those of the authors' NTKMTL-SR code
path, written out here as that code does it: per-sample losses (reduction 'none'), one
``autograd.grad`` per sample and task to the whole representation, the largest eigenvalue of
``J Jᵀ`` by ``torch.linalg.eigvalsh``, ``w = (Σλ/λ)^0.5`` and the weighted mean losses; on a
[B, D] and a token [B, N, C] representation. Then the absent-task rule, a task that does not
reach the representation, and the refusal without a representation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mtlopt


class Net(nn.Module):
    def __init__(self, tokens: bool, tasks: int = 3) -> None:
        super().__init__()
        self.tokens = tokens
        self.encoder = nn.Sequential(nn.Linear(3, 5), nn.Tanh())
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1)) for _ in range(tasks)
        )

    def per_sample(self, x, y):
        """[B, T] per-sample squared errors; each sample's output reads its own z_b only."""
        z = self.encoder(x)
        outs = [h(z).mean(dim=(1, 2)) if self.tokens else h(z).squeeze(-1) for h in self.heads]
        return z, torch.stack([(o - y[:, t]) ** 2 for t, o in enumerate(outs)], dim=1)


def _batch(tokens: bool, tasks: int = 3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn((6, 4, 3) if tokens else (6, 3), generator=g, dtype=torch.float64)
    scales = torch.tensor([1.0, 10.0, 0.1, 3.0][:tasks], dtype=torch.float64)
    return x, torch.randn(6, tasks, generator=g, dtype=torch.float64) * scales


def _authors_weights(model: Net, x, y, exponent=0.5) -> torch.Tensor:
    z, losses = model.per_sample(x, y)
    lam = []
    for t in range(losses.shape[1]):
        rows = [
            torch.autograd.grad(losses[b, t], z, retain_graph=True)[0].reshape(-1)
            for b in range(losses.shape[0])
        ]
        j = torch.stack(rows)
        lam.append(torch.linalg.eigvalsh(j @ j.T)[-1])
    lam = torch.stack(lam)
    return (lam.sum() / lam) ** exponent


@pytest.mark.parametrize("tokens", [False, True])
def test_gradients_equal_the_authors_code_path_written_out(tokens):
    torch.manual_seed(0)
    model = Net(tokens).double()
    reference = copy.deepcopy(model)
    x, y = _batch(tokens)
    weights = _authors_weights(reference, x, y)
    _, per_sample = reference.per_sample(x, y)
    (weights.detach() @ per_sample.mean(dim=0)).backward()

    opt = mtlopt.MTLOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), "ntkmtl_sr", representation=model.encoder
    )
    _, per_sample = model.per_sample(x, y)
    info = opt.step(list(per_sample.mean(dim=0)))
    torch.testing.assert_close(info.weights, weights, rtol=1e-10, atol=0)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-14)
    assert not torch.allclose(weights, torch.ones_like(weights))  # the check can fail


def test_the_weights_run_over_the_present_tasks():
    torch.manual_seed(0)
    model = Net(tokens=False).double()
    x, y = _batch(False)
    two = Net(tokens=False, tasks=2).double()
    two.encoder.load_state_dict(model.encoder.state_dict())
    two.heads[0].load_state_dict(model.heads[0].state_dict())
    two.heads[1].load_state_dict(model.heads[2].state_dict())
    expected = _authors_weights(two, x, y[:, [0, 2]])

    opt = mtlopt.MTLOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), "ntkmtl_sr", representation=model.encoder
    )
    _, per_sample = model.per_sample(x, y)
    losses = per_sample.mean(dim=0)
    info = opt.step({"a": losses[0], "b": None, "c": losses[2]})
    torch.testing.assert_close(info.weights[[0, 2]], expected, rtol=1e-10, atol=0)
    assert all(p.grad is None or not p.grad.any() for p in model.heads[1].parameters())


def test_a_task_that_does_not_reach_the_representation_gets_weight_zero():
    torch.manual_seed(0)
    model = Net(tokens=False, tasks=2).double()
    free = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
    opt = mtlopt.MTLOptimizer(
        torch.optim.SGD([*model.parameters(), free], lr=0.0), "ntkmtl_sr",
        representation=model.encoder,
    )  # fmt: skip
    x, y = _batch(False, tasks=2)
    _, per_sample = model.per_sample(x, y)
    info = opt.step([per_sample[:, 0].mean(), (free - 1.0) ** 2])
    assert float(info.weights[0]) == pytest.approx(1.0) and float(info.weights[1]) == 0.0


def test_losses_from_another_forward_pass_are_refused():
    """The hook keeps the last forward's representation: losses of an earlier forward don't reach
    it, and the step says so."""
    model = Net(tokens=False).double()
    opt = mtlopt.MTLOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), "ntkmtl_sr", representation=model.encoder
    )
    x, y = _batch(False)
    _, first = model.per_sample(x, y)
    model.per_sample(x + 1, y)  # another forward: the recorded representation is this one's
    with pytest.raises(ValueError, match="no task's loss depends on the recorded representation"):
        opt.step(list(first.mean(dim=0)))
