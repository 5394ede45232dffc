"""DWA: dynamic weight averaging."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from ..registry import register
from ._state import TaskAxes
from .base import LossStrategy, Scalarized


@register(
    "dwa",
    kind="loss",
    cost="1 backward",
    stateful=True,
    paper="Liu et al., End-to-End Multi-Task Learning with Attention (MTAN), CVPR 2019",
    conventions="temperature 2; loss averages over windows of `window` steps (default 25, the "
    "Nash-MTL code's iteration window) stand in for the paper's epoch averages; weights sum to T",
)
class DWA(LossStrategy):
    """Dynamic weight averaging (Liu et al., 2019, Eq. 1).

    ``w_i = T · softmax_i(r_i / temperature)`` with ``r_i = L̄_i(current window) / L̄_i(previous
    window)``: a task whose loss falls more slowly gets more weight. The paper averages over epochs;
    an optimizer sees steps, so the averages are taken over windows of ``window`` steps. A task's
    ratio is 1 until two full windows of its losses have been seen (the paper's first two epochs).

    Absent tasks: each task keeps its own window of the steps it was present in; the softmax and
    the factor T run over the present tasks.

    Args:
        temperature: softmax temperature (default 2).
        window: steps per averaging window (default 25).
    """

    absent_tasks = (
        "each task's loss window advances only when it is present; softmax and the factor "
        "T run over the present tasks"
    )

    _state_attrs = ("_history", "_seen")
    _task_state: ClassVar[dict[str, TaskAxes]] = {
        "_history": TaskAxes((0,), np.nan),
        "_seen": TaskAxes((0,), 0.0),
    }

    def __init__(self, temperature: float = 2.0, window: int = 25, num_tasks: int | None = None):
        super().__init__(num_tasks)
        if temperature <= 0 or window < 1:
            raise ValueError("temperature must be positive and window at least 1")
        self.temperature = temperature
        self.window = window
        self._history: np.ndarray | None = None
        """T × 2·window: each task's last losses, oldest first."""
        self._seen: np.ndarray | None = None
        """How many losses of each task the history holds."""

    def hyperparameters(self) -> dict[str, object]:
        return {"temperature": self.temperature, "window": self.window}

    def current_weights(self, num_tasks: int) -> np.ndarray:
        ratios = np.ones(num_tasks)
        if self._history is not None:
            full = self._seen >= 2 * self.window
            previous = self._history[:, : self.window].mean(axis=1)
            recent = self._history[:, self.window :].mean(axis=1)
            usable = full & (previous > 0)
            ratios[usable] = recent[usable] / previous[usable]
        logits = ratios / self.temperature
        exp = np.exp(logits - logits.max())
        return num_tasks * exp / exp.sum()

    def scalarize(self, losses: Tensor) -> Scalarized:
        t = losses.shape[0]
        weights = torch.from_numpy(self.current_weights(t)).to(losses)
        observed = losses.detach().double().cpu().numpy()
        history = np.full((t, 2 * self.window), np.nan) if self._history is None else self._history
        seen = np.zeros(t) if self._seen is None else self._seen

        def commit() -> None:
            self._history = np.concatenate([history[:, 1:], observed[:, None]], axis=1)
            self._seen = np.minimum(seen + 1, 2 * self.window)

        return Scalarized(loss=weights @ losses, weights=weights, commit=commit)
