"""Shared lists of strategies and a random-Jacobian generator for the property tests."""

from __future__ import annotations

import torch

import mtlopt

# Strategies whose aggregate() needs nothing but J (GradNorm also needs the losses).
NEEDS_LOSSES = {"gradnorm"}


def make(name: str, **kwargs) -> mtlopt.Strategy:
    if name == "pcgrad":
        kwargs.setdefault("seed", 0)
    return mtlopt.create(name, **kwargs)


def aggregate(name: str, jacobian: torch.Tensor, **kwargs) -> torch.Tensor:
    strategy = make(name, **kwargs)
    losses = torch.ones(jacobian.shape[0], dtype=torch.float64) if name in NEEDS_LOSSES else None
    return strategy.aggregate(jacobian, losses)


def gradient_strategies() -> list[str]:
    return [n for n in mtlopt.available() if mtlopt.info(n).kind.value == "gradient" or n == "ew"]


def random_jacobian(
    tasks: int, dim: int, seed: int, scale: float = 1.0, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tasks, dim, generator=g, dtype=torch.float64) * scale).to(dtype)
