"""Shared lists of strategies and a random-Jacobian generator for the property tests."""

from __future__ import annotations

import torch

import mtlopt

RANDOM = {"pcgrad", "gradvac", "graddrop", "rlw"}


def make(name: str, num_tasks: int | None = None, **kwargs) -> mtlopt.Strategy:
    """The strategy with a fixed seed where it draws random numbers."""
    if name in RANDOM:
        kwargs.setdefault("seed", 0)
    return mtlopt.create(name, num_tasks=num_tasks, **kwargs)


def aggregate(name: str, jacobian: torch.Tensor, losses=None, **kwargs) -> torch.Tensor:
    """``aggregate`` with unit losses for the strategies that read them (GradNorm, DB-MTL)."""
    strategy = make(name, jacobian.shape[0], **kwargs)
    if losses is None:
        losses = torch.ones(jacobian.shape[0], dtype=torch.float64)
    return strategy.aggregate(jacobian, losses)


def gradient_strategies() -> list[str]:
    return [n for n in mtlopt.available() if mtlopt.info(n).kind.value == "gradient" or n == "ew"]


def random_jacobian(
    tasks: int, dim: int, seed: int, scale: float = 1.0, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tasks, dim, generator=g, dtype=torch.float64) * scale).to(dtype)


# Issue 18 drop-ins (helper i18a). None draws random numbers; every generic suite reaches them
# through mtlopt.available() / gradient_strategies().
FIELD_DROPINS_18A = (
    "constant",
    "cosmos",
    "cr_mogm",
    "excess_mtl",
    "go4align",
    "igb",
    "krum",
    "ldc_mtl",
    "moco",
    "ntkmtl",
    "pbi",
    "pcd",
    "trimmed_mean",
)
