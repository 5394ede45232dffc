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
    "Nash-MTL code's iteration window) stand in for the paper's epoch averages; the authors' "
    "code keeps the weights fixed within an epoch, from the two previous epochs' average losses, "
    "ours slide by default (new weights every step); per_epoch=True with window = steps per "
    "epoch is the authors' scheme; weights sum to T",
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
        per_epoch: keep the weights fixed for ``window`` steps and renew them from the last two
            complete windows, as the authors' code does per epoch (set ``window`` to the steps
            of an epoch); default ``False``: the windows slide and the weights change every step.
    """

    absent_tasks = (
        "each task's loss window advances only when it is present; softmax and the factor "
        "T run over the present tasks"
    )

    _state_attrs = ("_history", "_seen", "_ratios")
    _task_state: ClassVar[dict[str, TaskAxes]] = {
        "_history": TaskAxes((0,), np.nan),
        "_seen": TaskAxes((0,), 0.0),
        "_ratios": TaskAxes((0,), 1.0),
    }

    def __init__(
        self,
        temperature: float = 2.0,
        window: int = 25,
        per_epoch: bool = False,
        num_tasks: int | None = None,
    ):
        super().__init__(num_tasks)
        if temperature <= 0 or window < 1:
            raise ValueError("temperature must be positive and window at least 1")
        self.temperature = temperature
        self.window = window
        self.per_epoch = per_epoch
        self._ratios: np.ndarray | None = None
        """Per task, the loss ratio of the last two complete windows (``per_epoch``)."""
        self._history: np.ndarray | None = None
        """T × 2·window: each task's last losses, oldest first."""
        self._seen: np.ndarray | None = None
        """How many losses of each task have been seen."""

    def hyperparameters(self) -> dict[str, object]:
        return {"temperature": self.temperature, "window": self.window, "per_epoch": self.per_epoch}

    def _window_ratios(self, history: np.ndarray, seen: np.ndarray) -> np.ndarray:
        """``L̄(recent window) / L̄(previous window)`` per task, 1 until two windows are full."""
        ratios = np.ones(history.shape[0])
        previous = history[:, : self.window].mean(axis=1)
        recent = history[:, self.window :].mean(axis=1)
        usable = (seen >= 2 * self.window) & (previous > 0)
        ratios[usable] = recent[usable] / previous[usable]
        return ratios

    def current_weights(self, num_tasks: int) -> np.ndarray:
        if self._history is None:
            ratios = np.ones(num_tasks)
        elif self.per_epoch:
            ratios = np.ones(num_tasks) if self._ratios is None else self._ratios
        else:
            ratios = self._window_ratios(self._history, self._seen)
        logits = ratios / self.temperature
        exp = np.exp(logits - logits.max())
        return num_tasks * exp / exp.sum()

    def scalarize(self, losses: Tensor) -> Scalarized:
        t = losses.shape[0]
        weights = torch.from_numpy(self.current_weights(t)).to(losses)
        observed = losses.detach().double().cpu().numpy()
        history = np.full((t, 2 * self.window), np.nan) if self._history is None else self._history
        seen = np.zeros(t) if self._seen is None else self._seen

        ratios = np.ones(t) if self._ratios is None else self._ratios

        def commit() -> None:
            new_history = np.concatenate([history[:, 1:], observed[:, None]], axis=1)
            count = seen + 1
            if self.per_epoch:
                ends = (count >= 2 * self.window) & (count % self.window == 0)
                self._ratios = np.where(ends, self._window_ratios(new_history, count), ratios)
            self._history, self._seen = new_history, count

        return Scalarized(loss=weights @ losses, weights=weights, commit=commit)
