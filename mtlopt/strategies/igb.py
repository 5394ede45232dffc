"""IGB: improvable gap balancing (v1)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from ..registry import register
from ._state import TaskAxes
from .base import LossStrategy, Scalarized


@register(
    "igb",
    kind="loss",
    cost="1 backward",
    stateful=True,
    paper="Dai et al., Improvable Gap Balancing for Multi-Task Learning, UAI 2023 (IGBv1)",
    conventions="base losses = each task's average over its first base_steps=25 steps (the "
    "authors' trainer averages a base epoch: base_steps = steps per epoch); weights 1 until then; "
    "the objective is Σ w_i log(L_i + 1e-8) throughout (the authors' code: log L_i); v2 (SAC "
    "agent) is not included",
)
class IGB(LossStrategy):
    """IGBv1 (Dai et al., 2023, Sec. 4.1).

    A task's improvable gap is estimated by its loss relative to its base loss ``L_i / L_i^base``;
    the weights ``w = T · softmax(L / L^base)`` (detached) favour the tasks with most left to
    gain, on the log-losses: ``L_IGB = Σ_i w_i log L_i``, whose effective weights are
    ``w_i / L_i``. Until the base losses are known (the average of each task's first
    ``base_steps`` losses) every ``w_i = 1``.

    Reference code: YanqiDai/IGB4MTL, ``methods/loss_weight_methods.py``
    (``ImprovableGapBalancing_v1``).

    Args:
        base_steps: steps averaged into each task's base loss (default 25).
        eps: ``ε`` inside the logarithm (default 1e-8).
    """

    absent_tasks = (
        "softmax and the factor T over the present tasks; an absent task's base-loss average "
        "does not advance"
    )

    linear_in_losses = False
    _state_attrs = ("base", "_sums", "_counts")
    _task_state: ClassVar[dict[str, TaskAxes]] = {
        "base": TaskAxes((0,), np.nan),
        "_sums": TaskAxes((0,), 0.0),
        "_counts": TaskAxes((0,), 0.0),
    }

    def __init__(self, base_steps: int = 25, eps: float = 1e-8, num_tasks: int | None = None):
        super().__init__(num_tasks)
        if base_steps < 1 or eps < 0:
            raise ValueError("base_steps must be at least 1 and eps non-negative")
        self.base_steps, self.eps = base_steps, eps
        self.base: np.ndarray | None = None
        self._sums: np.ndarray | None = None
        self._counts: np.ndarray | None = None

    def hyperparameters(self) -> dict[str, object]:
        return {"base_steps": self.base_steps, "eps": self.eps}

    def scalarize(self, losses: Tensor) -> Scalarized:
        t = losses.shape[0]
        observed = losses.detach().double().cpu().numpy()
        if np.any(observed + self.eps <= 0):
            raise ValueError(f"igb takes log-losses and needs positive losses, got {observed}")
        base = np.full(t, np.nan) if self.base is None else self.base
        if np.all(np.isfinite(base) & (base > 0)):
            logits = observed / base
            exp = np.exp(logits - logits.max())
            w = t * exp / exp.sum()
        else:
            w = np.ones(t)
        weights = torch.from_numpy(w).to(losses)
        loss = weights @ torch.log(losses + self.eps)
        sums = np.zeros(t) if self._sums is None else self._sums
        counts = np.zeros(t) if self._counts is None else self._counts

        def commit() -> None:
            collecting = counts < self.base_steps
            new_sums = np.where(collecting, sums + observed, sums)
            new_counts = np.where(collecting, counts + 1, counts)
            done = collecting & (new_counts >= self.base_steps)
            self.base = np.where(done, new_sums / self.base_steps, base)
            self._sums, self._counts = new_sums, new_counts

        return Scalarized(loss=loss, weights=(weights / (losses + self.eps)).detach(), commit=commit)
