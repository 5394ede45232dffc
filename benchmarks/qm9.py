"""QM9: 11 regression targets, a set transformer over atoms, L1 on standardized targets."""

from __future__ import annotations

import torch
from torch import nn

from .cache import cache_dir
from .data import QM9_TARGETS, qm9
from .models import SetTransformer
from .problem import Instance, Problem

TEST, VAL = 10000, 10000
QUICK_TEST = 2000


def setup(seed: int, variant: object, quick: bool, batch_size: int = 64) -> Instance:
    data = qm9(cache=cache_dir() / "qm9.pt")
    order = torch.randperm(len(data.atoms), generator=torch.Generator().manual_seed(0))
    test_idx = order[: QUICK_TEST if quick else TEST]
    train_idx = order[TEST + VAL :]
    train_idx = train_idx[
        torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(seed))
    ]
    mean, std = data.targets[train_idx].mean(0), data.targets[train_idx].std(0)

    def batch(step: int) -> tuple:
        start = (step * batch_size) % (len(train_idx) - batch_size)
        idx = train_idx[start : start + batch_size]
        return data.atoms[idx], data.positions[idx], (data.targets[idx] - mean) / std

    def losses(model: nn.Module, b: tuple) -> list[torch.Tensor]:
        atoms, positions, targets = b
        return [(out - targets[:, i]).abs().mean() for i, out in enumerate(model(atoms, positions))]

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, float]:
        model.eval()
        errors = torch.zeros(len(QM9_TARGETS))
        for start in range(0, len(test_idx), 1000):
            idx = test_idx[start : start + 1000]
            for i, out in enumerate(model(data.atoms[idx], data.positions[idx])):
                errors[i] += ((out * std[i] + mean[i]) - data.targets[idx, i]).abs().sum()
        model.train()
        return {
            f"{t} MAE": float(e) / len(test_idx) for t, e in zip(QM9_TARGETS, errors, strict=True)
        }

    torch.manual_seed(seed)
    model = SetTransformer(len(QM9_TARGETS))
    return Instance(
        model=model,
        batch=batch,
        losses=losses,
        evaluate=evaluate,
        lr=1e-3,
        blocks=model.blocks,
        representation=model.norm,
    )


PROBLEM = Problem(
    name="qm9",
    description="QM9 (qm9pack), 11 targets (total energies U0/U/H/G in Hartree, as shipped), set "
    "transformer dim 64 depth 4, batch 64, Adam 1e-3, L1 on standardized targets; split "
    f"{TEST} test / {VAL} validation (unused) / rest train, scaled down from 110k/10k/10k "
    "training epochs to a fixed step budget (quick: 2000 test molecules)",
    tasks=QM9_TARGETS,
    metrics={f"{t} MAE": True for t in QM9_TARGETS},
    metric_task={f"{t} MAE": i for i, t in enumerate(QM9_TARGETS)},
    setup=setup,
    steps=1000,
    quick_steps=30,
    quick_methods=["ew", "pcgrad"],
)
