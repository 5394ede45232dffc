"""A tiny Adam on a NumPy vector, for strategies that learn a handful of task weights themselves."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class AdamState:
    m: np.ndarray
    v: np.ndarray
    t: np.ndarray
    """Steps taken by each entry (entries of absent tasks are not stepped)."""

    @classmethod
    def zeros(cls, size: int) -> AdamState:
        return cls(np.zeros(size), np.zeros(size), np.zeros(size))


def adam_step(
    params: np.ndarray,
    grad: np.ndarray,
    state: AdamState,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> tuple[np.ndarray, AdamState]:
    """One step of ``torch.optim.Adam`` (L2 weight decay added to the gradient, as torch does)."""
    grad = grad + weight_decay * params
    b1, b2 = betas
    t = state.t + 1
    m = b1 * state.m + (1 - b1) * grad
    v = b2 * state.v + (1 - b2) * grad**2
    update = lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return params - update, replace(state, m=m, v=v, t=t)
