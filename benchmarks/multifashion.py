"""MultiFashion: two Fashion-MNIST items on a 36×36 canvas, a small ViT, two classifications."""

from __future__ import annotations

import torch
from torch import nn

from .data import multifashion
from .models import ViT
from .problem import Instance, Problem

TRAIN, TEST = 20000, 5000
QUICK_TRAIN, QUICK_TEST = 4000, 1000
VALIDATION = 1000
"""Validation canvases (for CoBa, PIVRG): composed afresh (seed 2) from Fashion-MNIST's training
items, so new pairs but not new items; the test canvases are never used for training decisions."""


def setup(seed: int, variant: object, quick: bool, batch_size: int = 128) -> Instance:
    train = multifashion("train", QUICK_TRAIN if quick else TRAIN, seed=0)
    test = multifashion("test", QUICK_TEST if quick else TEST, seed=1)
    held_out = multifashion("train", VALIDATION // 2 if quick else VALIDATION, seed=2)
    order = torch.randperm(len(train.images), generator=torch.Generator().manual_seed(seed))

    def batch(step: int) -> tuple:
        start = (step * batch_size) % (len(order) - batch_size)
        idx = order[start : start + batch_size]
        return train.images[idx], train.labels[idx, :2]

    def losses(model: nn.Module, b: tuple) -> list[torch.Tensor]:
        images, labels = b
        return [
            nn.functional.cross_entropy(out, labels[:, i]) for i, out in enumerate(model(images))
        ]

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, float]:
        model.eval()
        correct = torch.zeros(2)
        for start in range(0, len(test.images), 500):
            outs = model(test.images[start : start + 500])
            for i, out in enumerate(outs):
                correct[i] += (out.argmax(-1) == test.labels[start : start + 500, i]).sum()
        model.train()
        n = len(test.images)
        return {"left acc": float(correct[0]) / n, "right acc": float(correct[1]) / n}

    def validation(model: nn.Module, step: int) -> list[torch.Tensor]:
        start = (step * batch_size) % (len(held_out.images) - batch_size)
        rows = slice(start, start + batch_size)
        return losses(model, (held_out.images[rows], held_out.labels[rows, :2]))

    torch.manual_seed(seed)
    model = ViT([10, 10])
    return Instance(
        model=model,
        batch=batch,
        losses=losses,
        evaluate=evaluate,
        lr=1e-3,
        blocks=model.blocks,
        representation=model.norm,
        validation=validation,
    )


PROBLEM = Problem(
    name="multifashion",
    description=f"MultiFashion 36×36 (top-left and bottom-right items), ViT dim 64 depth 4 patch 6, "
    f"batch 128, Adam 1e-3; train {TRAIN} / test {TEST} canvases (quick: {QUICK_TRAIN} / "
    f"{QUICK_TEST})",
    tasks=["left", "right"],
    metrics={"left acc": False, "right acc": False},
    metric_task={"left acc": 0, "right acc": 1},
    setup=setup,
    steps=1500,
    quick_steps=60,
    quick_methods=["ew", "pcgrad", "dtme"],
)
