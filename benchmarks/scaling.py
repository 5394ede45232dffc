"""Many-task scaling: synthetic linear regression with K tasks (FAMO's demo, K from 2 to 100)."""

from __future__ import annotations

import torch
from torch import nn

from .problem import Instance, Problem


class Regressor(nn.Module):
    def __init__(self, inputs: int, tasks: int, hidden: int = 128) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        # One module per task: a single Linear(hidden, K) would connect every task's loss to every
        # row in the autograd graph, and its weight would be detected as shared.
        self.heads = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(tasks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = self.trunk(x)
        return [head(features).squeeze(-1) for head in self.heads]


def setup(seed: int, tasks: int, quick: bool, n: int = 1000, inputs: int = 20) -> Instance:
    g = torch.Generator().manual_seed(1000 + tasks)
    x = torch.randn(n, inputs, generator=g)
    y = torch.tanh(x @ torch.randn(inputs, tasks, generator=g))

    def batch(step: int) -> tuple:
        idx = torch.randint(
            0, n, (128,), generator=torch.Generator().manual_seed(seed * 100003 + step)
        )
        return x[idx], y[idx]

    def losses(model: nn.Module, b: tuple) -> list[torch.Tensor]:
        return [((out - b[1][:, i]) ** 2).mean() for i, out in enumerate(model(b[0]))]

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, float]:
        outs = torch.stack(model(x), dim=1)
        return {"mean MSE": float(((outs - y) ** 2).mean())}

    torch.manual_seed(seed)
    return Instance(model=Regressor(inputs, tasks), batch=batch, losses=losses, evaluate=evaluate)


PROBLEM = Problem(
    name="scaling",
    description="synthetic regression, X ∈ R^{1000×20}, y_k = tanh(x·w_k), MLP trunk 20→128→128, "
    "batch 128, Adam 1e-3; K tasks (variants) from 2 to 100",
    tasks=["K tasks"],
    metrics={"mean MSE": True},
    metric_task={},
    setup=setup,
    steps=100,
    quick_steps=15,
    quick_methods=["ew", "pcgrad", "mgda", "nash_mtl", "famo"],
    variants=[2, 5, 10, 20, 50, 100],
    quick_variants=[2, 10, 40],
    single_task_baselines=False,
    excluded={"dtme": "no transformer"},
)
