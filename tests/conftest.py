from __future__ import annotations

import os
import random

import pytest
import torch
from hypothesis import settings
from torch import nn

# CI replays a fixed set of examples (derandomized) so it cannot flake; local runs keep exploring.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    torch.manual_seed(0)


class SharedTrunkNet(nn.Module):
    """A trunk shared by all tasks and one linear head per task."""

    def __init__(self, tasks: int = 2, inputs: int = 6, hidden: int = 8) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, hidden))
        self.heads = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(tasks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = self.trunk(x)
        return [head(features).squeeze(-1) for head in self.heads]


def make_batch(tasks: int = 2, n: int = 16, inputs: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, inputs, generator=g), torch.randn(n, tasks, generator=g)


def losses_of(model: SharedTrunkNet, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    return [((p - y[:, i]) ** 2).mean() for i, p in enumerate(model(x))]


@pytest.fixture
def net() -> SharedTrunkNet:
    return SharedTrunkNet()
