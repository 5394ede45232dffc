"""An example of your own problem for ``mtlopt-bench``, kept outside the package.

    mtlopt-bench run --problem examples.two_regressions:problem --methods ew,pcgrad,uw --seeds 3

Two regression tasks on a shared MLP, one with targets 20 times larger than the other and
partly opposed to it: the loss scales differ and the gradients conflict.
"""

from __future__ import annotations

import torch
from torch import nn

from mtlopt_bench.problem import Instance, Problem


class SharedMLP(nn.Module):
    def __init__(self, inputs: int = 8, hidden: int = 32, tasks: int = 2) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, hidden))
        self.heads = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(tasks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = torch.tanh(self.trunk(x))
        return [head(h).squeeze(-1) for head in self.heads]


def setup(seed: int, variant: object, quick: bool) -> Instance:
    data = torch.Generator().manual_seed(0)  # the data is the same for every seed
    w = torch.randn(8, 2, generator=data)
    w[:, 1] = -0.5 * w[:, 0] + 0.5 * w[:, 1]  # task b partly opposes task a
    x_train, x_test = torch.randn(2048, 8, generator=data), torch.randn(512, 8, generator=data)

    def targets(x: torch.Tensor) -> torch.Tensor:
        y = torch.sin(x @ w)
        return torch.stack([y[:, 0], 20 * y[:, 1]], 1)

    y_train, y_test = targets(x_train), targets(x_test)
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = order[(step * 64) % (len(order) - 64) :][:64]
        return x_train[idx], y_train[idx]

    def losses(model: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
        x, y = b
        return [((p - y[:, i]) ** 2).mean() for i, p in enumerate(model(x))]

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, float]:
        a, b = model(x_test)
        return {
            "a MSE": float(((a - y_test[:, 0]) ** 2).mean()),
            "b MSE": float(((b - y_test[:, 1]) ** 2).mean()),
        }

    torch.manual_seed(seed)
    return Instance(model=SharedMLP(), batch=batch, losses=losses, evaluate=evaluate, lr=3e-3)


problem = Problem(
    name="two_regressions",
    description="two regressions on a shared MLP (8 → 32 → 32), targets of scales 1 and 20, "
    "partly opposed; batch 64, Adam 3e-3",
    tasks=["a", "b"],
    metrics={"a MSE": True, "b MSE": True},
    metric_task={"a MSE": 0, "b MSE": 1},
    setup=setup,
    steps=300,
    quick_steps=40,
    quick_methods=["ew", "pcgrad", "uw"],
)
