"""DWA: dynamic weight averaging."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..registry import register
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
    "ours slide (new weights every step; window = steps per epoch gives the same averages at "
    "epoch boundaries); weights sum to T",
)
class DWA(LossStrategy):
    """Dynamic weight averaging (Liu et al., 2019, Eq. 1).

    ``w_i = T · softmax_i(r_i / temperature)`` with ``r_i = L̄_i(current window) / L̄_i(previous
    window)``: a task whose loss falls more slowly gets more weight. The paper averages over epochs;
    an optimizer sees steps, so the averages are taken over windows of ``window`` steps. Weights are
    1 until two full windows have been seen (the paper's first two epochs).

    Args:
        temperature: softmax temperature (default 2).
        window: steps per averaging window (default 25).
    """

    _state_attrs = ("_history",)

    def __init__(self, temperature: float = 2.0, window: int = 25, num_tasks: int | None = None):
        super().__init__(num_tasks)
        if temperature <= 0 or window < 1:
            raise ValueError("temperature must be positive and window at least 1")
        self.temperature = temperature
        self.window = window
        self._history: list[np.ndarray] = []

    def hyperparameters(self) -> dict[str, object]:
        return {"temperature": self.temperature, "window": self.window}

    def current_weights(self, num_tasks: int) -> np.ndarray:
        if len(self._history) < 2 * self.window:
            return np.ones(num_tasks)
        history = np.stack(self._history)
        previous = history[: self.window].mean(axis=0)
        recent = history[self.window :].mean(axis=0)
        ratios = np.divide(recent, previous, out=np.ones(num_tasks), where=previous > 0)
        logits = ratios / self.temperature
        exp = np.exp(logits - logits.max())
        return num_tasks * exp / exp.sum()

    def scalarize(self, losses: Tensor) -> Scalarized:
        weights = torch.from_numpy(self.current_weights(losses.shape[0])).to(losses)
        observed = losses.detach().double().cpu().numpy()

        def commit() -> None:
            self._history = [*self._history, observed][-2 * self.window :]

        return Scalarized(loss=weights @ losses, weights=weights, commit=commit)
