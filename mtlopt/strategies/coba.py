"""CoBa: convergence balancer from the slopes of validation losses."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ..hooks import Observing
from ..registry import register
from ._state import TaskAxes
from .base import LossStrategy, Scalarized


@register(
    "coba",
    kind="loss",
    cost="1 backward",
    stateful=True,
    paper="Gong et al., CoBa: Convergence Balancer for Multitask Finetuning of Large Language "
    "Models, EMNLP 2024",
    conventions="warmup=100 observations, history=200, tau=5 (official code); one observation "
    "per opt.observe (official: one validation batch per update); validation losses divided by "
    "the first observation's; slopes by least squares over the last `history` observations; ACS "
    "over the last `history` slopes; DF over every recorded slope, uncapped (official code); "
    "weights sum to 1",
    hooks=("validation_losses",),
)
class CoBa(Observing, LossStrategy):
    """CoBa (Gong et al., EMNLP 2024, Eqs. 3-9).

    Each observation appends the validation losses ``v_t`` (divided by the first observation's)
    to a history; after ``warmup`` observations the least-squares slopes ``α_t`` of the last
    ``history`` values, and ``α_max`` of ``max_t v_t``, give::

        RCS = softmax(T α / Σ_t |α_t|)                              relative convergence
        ACS = softmax(−N′ α_t / Σ_{s ∈ window} |α_t(s)|)            absolute convergence
        DF  = N · softmax(−τ N α_max / Σ_s |α_max(s)|)_N            divergence factor
        w   = softmax(T (DF · RCS + (1 − DF) · ACS))

    (``N′`` slopes in the window, ``N`` recorded in all; weights below ``1/(10T)`` lift every
    weight to ``w (1 − T w_min) + w_min``). The loss is ``Σ_t w_t ℓ_t``, uniform weights before
    the warm-up. Feed it with ``opt.observe(validation_losses=...)`` — before the first step (the
    normaliser) and then as often as the weights should move (the authors: every step, one
    validation batch) — or once with a function, called before every step.

    Args:
        warmup: observations with uniform weights (default 100).
        history: window of the slopes, in observations (default 200).
        tau: temperature ``τ`` of the divergence factor (default 5).
    """

    absent_tasks = (
        "the present tasks' weights renormalised to sum 1; every observation needs every task"
    )

    signals: ClassVar[tuple[str, ...]] = ("validation_losses",)
    _state_attrs = ("initial", "history", "slopes", "max_slopes", "observations", "weights")
    _task_state: ClassVar[dict[str, TaskAxes]] = {"weights": TaskAxes((0,), np.nan)}

    def __init__(
        self, warmup: int = 100, history: int = 200, tau: float = 5.0,
        num_tasks: int | None = None,
    ):  # fmt: skip
        super().__init__(num_tasks)
        if warmup < 1 or history < 2:
            raise ValueError(f"need warmup >= 1 and history >= 2, got {warmup}, {history}")
        self.warmup, self.history_length, self.tau = warmup, history, tau
        self.initial: np.ndarray | None = None
        self.history: np.ndarray | None = None  # T × (≤ history) normalised validation losses
        self.slopes: np.ndarray | None = None  # T × (≤ history) per-task slopes
        self.max_slopes: np.ndarray | None = None  # every slope of max_t v_t
        self.observations = 0
        self.weights: np.ndarray | None = None

    def hyperparameters(self) -> dict[str, object]:
        return {"warmup": self.warmup, "history": self.history_length, "tau": self.tau}

    def has_signal(self) -> bool:
        return self.initial is not None

    def observe_signal(self, name: str, value: Any) -> None:
        value = np.asarray(value, dtype=np.float64)
        if self.num_tasks is not None and value.size != self.num_tasks:
            raise ValueError(f"coba got {value.size} validation losses for {self.num_tasks} tasks")
        if self.initial is None:
            if np.any(value <= 0):
                raise ValueError(f"coba needs positive validation losses, got {value.tolist()}")
            self.initial = value
            return
        column = (value / self.initial)[:, None]
        history = column if self.history is None else np.hstack([self.history, column])
        self.history = history[:, -self.history_length :]
        self.observations += 1
        if self.observations >= self.warmup and self.history.shape[1] >= 2:
            self._reweigh()

    def _reweigh(self) -> None:
        t = self.history.shape[0]
        alpha = np.array([slope(row) for row in self.history])
        alpha_max = slope(self.history.max(axis=0))
        slopes = alpha[:, None] if self.slopes is None else np.hstack([self.slopes, alpha[:, None]])
        self.slopes = slopes[:, -self.history_length :]
        self.max_slopes = np.append(
            np.zeros(0) if self.max_slopes is None else self.max_slopes, alpha_max
        )
        rcs = softmax(t * alpha / _positive(np.abs(alpha).sum()))
        window = self.slopes.shape[1]
        acs = softmax(-window * alpha / _positive(np.abs(self.slopes).sum(axis=1)))
        n = self.max_slopes.size
        divergence = n * softmax(-self.tau * n * self.max_slopes / _positive(
            np.abs(self.max_slopes).sum()
        ))[-1]  # fmt: skip
        w = softmax(t * (divergence * rcs + (1 - divergence) * acs))
        floor = 1.0 / (10 * t)
        if np.any(w < floor):
            w = w * (1 - floor * t) + floor
        self.weights = w

    def scalarize(self, losses: Tensor) -> Scalarized:
        t = losses.shape[0]
        w = np.full(t, 1.0 / t) if self.weights is None else np.nan_to_num(self.weights, nan=1 / t)
        w = torch.from_numpy(w / w.sum()).to(losses)
        return Scalarized(loss=(w * losses).sum(), weights=w)


def slope(values: np.ndarray) -> float:
    """Least-squares slope of ``values`` against their index."""
    x = np.arange(values.size, dtype=np.float64)
    x = x - x.mean()
    return float((x @ (values - values.mean())) / (x @ x))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _positive(x: Any) -> Any:
    return np.where(np.asarray(x) > 0, x, 1.0)
