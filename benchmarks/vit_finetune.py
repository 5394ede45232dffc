"""ViT fine-tuning: DTME's regime (a pretrained transformer, fresh heads, dense prediction).

A small ViT (depth 6, width 64, 6×6 patches on a 36×36 canvas) is pretrained once on a
single-task source, one Fashion-MNIST item (downscaled to 18×18) at a random position, 10-way,
and cached outside the results (:func:`mtlopt_bench.cache.cache_dir`). Each run then fine-tunes
the whole trunk with fresh heads on three target tasks, two items on one canvas (the left one in
columns 0–23, the right one in columns 12–35, rows anywhere, overlapping by pixel-wise maximum):

- ``left``: the left item's class (10-way, mean token);
- ``right``: the right item's class (10-way, mean token);
- ``parts``: per patch, token-level, which item covers it most, or background (3-way; the dense
  task DTME targets).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor, nn

import mtlopt

from .cache import cache_dir
from .data import fashion_mnist
from .models import ViT
from .problem import Instance, Problem

ITEM = 18
CANVAS = 36
PATCH = 6
INK = 2.0
"""A patch whose two items each put less than this much ink (pixel sum, of 36 pixels in [0, 1])
is background."""
TRAIN, TEST = 20000, 2000
QUICK_TRAIN, QUICK_TEST = 1000, 300


@dataclass(frozen=True)
class Pretraining:
    """The source task's schedule (the trunk is cached under a name derived from it)."""

    steps: int = 1500
    batch: int = 128
    lr: float = 1e-3
    depth: int = 6
    dim: int = 64
    heads: int = 4
    seed: int = 0

    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:10]


FULL_PRETRAINING = Pretraining()
QUICK_PRETRAINING = Pretraining(steps=120, batch=64)


_ITEMS: dict[str, tuple[Tensor, Tensor]] = {}


def items(split: str) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST images of ``split`` downscaled to 18×18 (antialiased bilinear), labels."""
    if split not in _ITEMS:
        images, labels = fashion_mnist(split)
        x = torch.from_numpy(images.copy()).float().div_(255.0)[:, None]
        small = nn.functional.interpolate(
            x, size=(ITEM, ITEM), mode="bilinear", antialias=True, align_corners=False
        )
        _ITEMS[split] = small[:, 0].clamp_(0, 1), torch.from_numpy(labels.astype(np.int64))
    return _ITEMS[split]


def _place(images: Tensor, rows: np.ndarray, cols: np.ndarray) -> Tensor:
    canvas = torch.zeros(len(images), CANVAS, CANVAS)
    for i, (r, c) in enumerate(zip(rows, cols, strict=True)):
        canvas[i, r : r + ITEM, c : c + ITEM] = images[i]
    return canvas


def source(split: str, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """One item at a random position, its class."""
    images, labels = items(split)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(images), size)
    span = CANVAS - ITEM + 1
    canvas = _place(images[pick], rng.integers(0, span, size), rng.integers(0, span, size))
    return canvas, labels[pick]


@dataclass
class Target:
    images: Tensor  # [n, 36, 36]
    classes: Tensor  # [n, 2]: left item, right item
    parts: Tensor  # [n, 36]: per patch 0 background, 1 left item, 2 right item


def target(split: str, size: int, seed: int) -> Target:
    images, labels = items(split)
    rng = np.random.default_rng(seed)
    left, right = rng.choice(len(images), size), rng.choice(len(images), size)
    span = CANVAS - ITEM + 1
    a = _place(images[left], rng.integers(0, span, size), rng.integers(0, 7, size))
    b = _place(images[right], rng.integers(0, span, size), rng.integers(12, 19, size))
    side = CANVAS // PATCH

    def ink(canvas: Tensor) -> Tensor:
        return canvas.reshape(size, side, PATCH, side, PATCH).sum((2, 4)).reshape(size, -1)

    ink_a, ink_b = ink(a), ink(b)
    parts = torch.where(ink_a >= ink_b, 1, 2)
    parts[torch.maximum(ink_a, ink_b) < INK] = 0
    classes = torch.stack([labels[left], labels[right]], 1)
    return Target(torch.maximum(a, b), classes, parts)


class FineTuneViT(ViT):
    """The pretrained trunk with fresh heads: two classifiers on the mean token of their stream,
    one per-token 3-way classifier (heads read their task's stream with ``task_view``)."""

    def __init__(self, depth: int = 6, dim: int = 64, heads: int = 4) -> None:
        super().__init__([10, 10], CANVAS, PATCH, dim, depth, heads)
        self.parts = nn.Linear(dim, 3)

    def decode(self, x: Tensor) -> list[Tensor]:
        left, right = (head(mtlopt.task_view(x, i).mean(1)) for i, head in enumerate(self.heads))
        return [left, right, self.parts(mtlopt.task_view(x, 2))]


TRUNK = ("embed.", "pos", "blocks.", "norm.")


def pretrained_trunk(config: Pretraining, progress: bool = False) -> dict[str, Tensor]:
    """The source-trained trunk's state (embedding, positions, blocks, final norm), trained once
    and cached in ``cache_dir()/vit_finetune``."""
    path = cache_dir() / "vit_finetune" / f"trunk-{config.key()}.pt"
    if path.exists():
        return torch.load(path)["trunk"]
    torch.manual_seed(config.seed)
    model = ViT([10], CANVAS, PATCH, config.dim, config.depth, config.heads)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    x, y = source("train", config.steps * config.batch, seed=1000 + config.seed)
    start = time.perf_counter()
    steps = range(config.steps)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="pretraining the ViT trunk (once, cached)", unit="step")
    for step in steps:
        idx = slice(step * config.batch, (step + 1) * config.batch)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx])[0], y[idx]).backward()
        opt.step()
    tx, ty = source("test", 2000, seed=2000 + config.seed)
    model.eval()
    with torch.no_grad():
        accuracy = float((model(tx)[0].argmax(-1) == ty).float().mean())
    trunk = {k: v for k, v in model.state_dict().items() if k.startswith(TRUNK)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    info = {**asdict(config), "source_accuracy": accuracy, "seconds": time.perf_counter() - start}
    torch.save({"trunk": trunk, "info": info}, tmp)
    os.replace(tmp, path)
    return trunk


def trunk_info(config: Pretraining) -> dict:
    path = cache_dir() / "vit_finetune" / f"trunk-{config.key()}.pt"
    return torch.load(path)["info"] if path.exists() else {}


def build_model(trunk: dict[str, Tensor], config: Pretraining, seed: int) -> FineTuneViT:
    """The pretrained trunk with heads initialised from ``seed`` (the same in every arm)."""
    torch.manual_seed(seed)
    model = FineTuneViT(config.depth, config.dim, config.heads)
    missing, unexpected = model.load_state_dict(trunk, strict=False)
    assert not unexpected and all(not k.startswith(TRUNK) for k in missing), (missing, unexpected)
    return model


def losses(model: nn.Module, batch: tuple) -> list[Tensor]:
    images, classes, parts = batch
    left, right, dense = model(images)
    return [
        nn.functional.cross_entropy(left, classes[:, 0]),
        nn.functional.cross_entropy(right, classes[:, 1]),
        nn.functional.cross_entropy(dense.reshape(-1, 3), parts.reshape(-1)),
    ]


@torch.no_grad()
def evaluate(model: nn.Module, test: Target) -> dict[str, float]:
    """Left and right accuracy; the dense task's mean IoU over background, left, right."""
    was = model.training
    model.eval()
    correct = torch.zeros(2)
    confusion = torch.zeros(3, 3)
    for start in range(0, len(test.images), 500):
        chunk = slice(start, start + 500)
        left, right, dense = model(test.images[chunk])
        correct[0] += (left.argmax(-1) == test.classes[chunk, 0]).sum()
        correct[1] += (right.argmax(-1) == test.classes[chunk, 1]).sum()
        pred, true = dense.argmax(-1).reshape(-1), test.parts[chunk].reshape(-1)
        confusion += torch.bincount(true * 3 + pred, minlength=9).reshape(3, 3).float()
    model.train(was)
    inter = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - inter
    n = len(test.images)
    return {
        "left acc": float(correct[0]) / n,
        "right acc": float(correct[1]) / n,
        "parts mIoU": float((inter / union.clamp_min(1)).mean()),
    }


@dataclass
class Setting:
    """One scale of the problem: pretraining, data sizes, batch."""

    pretraining: Pretraining
    train: int
    test: int
    batch: int


FULL = Setting(FULL_PRETRAINING, TRAIN, TEST, 128)
QUICK = Setting(QUICK_PRETRAINING, QUICK_TRAIN, QUICK_TEST, 32)


def analysis_batches(data: Target, batch: int, count: int) -> list[tuple]:
    """The fixed batches of DTME's offline analysis at iteration 0: the first ``count`` batches
    of the training set in its stored (random) order, the same for every seed and arm."""
    return [
        (data.images[i * batch : (i + 1) * batch], data.classes[i * batch : (i + 1) * batch],
         data.parts[i * batch : (i + 1) * batch])
        for i in range(count)
    ]


_DATA: dict[tuple, tuple[Target, Target]] = {}


def data(setting: Setting) -> tuple[Target, Target]:
    key = (setting.train, setting.test)
    if key not in _DATA:
        _DATA[key] = (target("train", setting.train, 0), target("test", setting.test, 1))
    return _DATA[key]


def instance(
    setting: Setting, seed: int, analysis_count: int = 8, analysis_batch: int = 128
) -> Instance:
    train, test = data(setting)
    trunk = pretrained_trunk(setting.pretraining)
    model = build_model(trunk, setting.pretraining, seed)
    order = torch.randperm(len(train.images), generator=torch.Generator().manual_seed(seed))
    size = setting.batch

    def batch(step: int) -> tuple:
        start = (step * size) % (len(order) - size)
        idx = order[start : start + size]
        return train.images[idx], train.classes[idx], train.parts[idx]

    return Instance(
        model=model,
        batch=batch,
        losses=losses,
        evaluate=lambda m: evaluate(m, test),
        lr=1e-3,
        blocks=model.blocks,
        plan_batches=analysis_batches(train, analysis_batch, analysis_count),
    )


def setup(seed: int, variant: object, quick: bool) -> Instance:
    return instance(QUICK if quick else FULL, seed, 2 if quick else 8, 64 if quick else 128)


PROBLEM = Problem(
    name="vit_finetune",
    description=f"ViT depth 6 width 64 pretrained on one Fashion-MNIST item (18×18) at a random "
    f"position on a 36×36 canvas ({FULL_PRETRAINING.steps} steps × {FULL_PRETRAINING.batch}, "
    f"cached), fine-tuned with fresh heads on left class, right class and per-patch parts; "
    f"batch 128, Adam 1e-3; train {TRAIN} / test {TEST} (quick: pretraining "
    f"{QUICK_PRETRAINING.steps} × {QUICK_PRETRAINING.batch}, batch 32, {QUICK_TRAIN} / "
    f"{QUICK_TEST}); DTME plans at iteration 0 from an offline analysis",
    tasks=["left", "right", "parts"],
    metrics={"left acc": False, "right acc": False, "parts mIoU": False},
    metric_task={"left acc": 0, "right acc": 1, "parts mIoU": 2},
    setup=setup,
    steps=300,
    quick_steps=10,
    quick_methods=["ew", "dtme"],
    notes="The placement study (random, reverse, swapped, TM/TE only, compute-matched EW, "
    "budgeted DTME, DTME+UPGrad): python -m mtlopt_bench.dtme_placement",
)


