"""PIVRG: performance-informed variance reduction (fair bargaining with performance preferences)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ..hooks import Observing
from ..registry import register
from ..solvers import fair_weights
from ._state import TaskAxes
from .base import Commit, GramianStrategy, _noop, check_max_norm, clip_weights


@register(
    "pivrg",
    kind="gradient",
    cost="T backward",
    stateful=True,
    paper="Revisiting Fairness in Multitask Learning: A Performance-Driven Approach for Variance "
    "Reduction (PIVRG), CVPR 2025",
    conventions="bound=2, mintemp=10 (code in jianke0604/NTKMTL); the equation solved exactly "
    "(FairGrad's Newton solver after a diagonal rescaling; the code uses scipy least_squares); "
    "update Σ α_i g_i: the code multiplies it by T and clips it to norm 1 (times_tasks=True, "
    "max_norm=1.0); the scores are the caller's (the public code does not show how they are made)",
    hooks=("scores",),
)
class PIVRG(Observing, GramianStrategy):
    """PIVRG (CVPR 2025): FairGrad-style bargaining with preferences from performance scores.

    With per-task scores ``s`` (higher: the task is doing worse and needs more weight; the paper
    uses each task's performance drop, in percent, relative to its single-task model),
    ``temp = max((max s − min s) / log(bound), mintemp)`` and ``ŵ = T softmax(s / temp)`` (so no
    preference exceeds another by more than ``bound``), the weights ``α > 0`` solve::

        G α = (ŵ / α)^{1/2}

    and the update is ``Σ_t α_t g_t``. Equal scores give FairGrad with α = 2. Feed the scores with
    ``opt.observe(scores=...)`` before the first step and whenever they change (a function instead
    is called before every step).

    Args:
        bound: largest ratio of two preferences (default 2).
        mintemp: lowest temperature (default 10).
        times_tasks: multiply the update by T, as the authors' code (default False).
        max_norm: then clip the update to this norm (default None; the code clips to 1).
    """

    absent_tasks = "the present tasks' scores give the preferences; an absent task's score is kept"

    signals: ClassVar[tuple[str, ...]] = ("scores",)
    _state_attrs = ("scores",)
    _task_state: ClassVar[dict[str, TaskAxes]] = {"scores": TaskAxes((0,), np.nan)}

    def __init__(
        self, bound: float = 2.0, mintemp: float = 10.0, times_tasks: bool = False,
        max_norm: float | None = None, num_tasks: int | None = None,
    ):  # fmt: skip
        super().__init__(num_tasks)
        if not bound > 1 or not mintemp > 0:
            raise ValueError(f"need bound > 1 and mintemp > 0, got {bound}, {mintemp}")
        check_max_norm(max_norm)
        self.bound, self.mintemp = bound, mintemp
        self.times_tasks, self.max_norm = times_tasks, max_norm
        self.scores: np.ndarray | None = None

    def hyperparameters(self) -> dict[str, object]:
        return {
            "bound": self.bound, "mintemp": self.mintemp, "times_tasks": self.times_tasks,
            "max_norm": self.max_norm,
        }  # fmt: skip

    def has_signal(self) -> bool:
        return self.scores is not None

    def observe_signal(self, name: str, value: Any) -> None:
        value = np.asarray(value, dtype=np.float64)
        if self.num_tasks is not None and value.size != self.num_tasks:
            raise ValueError(f"pivrg got {value.size} scores for {self.num_tasks} tasks")
        self.scores = value

    def preferences(self, scores: np.ndarray) -> np.ndarray:
        """``ŵ = T softmax(s / temp)``."""
        temp = max((scores.max() - scores.min()) / np.log(self.bound), self.mintemp)
        e = np.exp((scores - scores.max()) / temp)
        return scores.size * e / e.sum()

    def weigh(self, gramian: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, Commit]:
        t = gramian.shape[0]
        scores = np.zeros(t) if self.scores is None else np.nan_to_num(self.scores, nan=0.0)
        preference = self.preferences(scores)
        # G α = √(ŵ/α) is FairGrad's G̃ β = β^{-1/2} with G̃ = D⁻¹ G D⁻¹, D = diag(ŵ), α = β / ŵ.
        scaled = gramian / np.outer(preference, preference)
        alpha = fair_weights(scaled, alpha=2.0) / preference
        if self.times_tasks:
            alpha = alpha * t
        return clip_weights(alpha, gramian, self.max_norm), _noop
