"""Nash-MTL: multi-task learning as a bargaining game."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from ..registry import register
from ..solvers import fair_weights
from ._state import TaskAxes
from .base import Commit, GramianStrategy, check_max_norm, clip_weights


@register(
    "nash_mtl",
    kind="gradient",
    cost="T backward",
    stateful=True,
    paper="Navon et al., Multi-Task Learning as a Bargaining Game, ICML 2022",
    conventions="max_norm=1.0 (the authors' code clips the shared gradient to norm 1; None "
    "disables); update_weights_every=1; α_i (Gα)_i = 1 on the raw Gramian, as the authors' code "
    "(their ‖G‖_F normalisation cancels), so ‖update‖ = √T before clipping; bargaining condition "
    "solved exactly by Newton's method on its convex potential instead of the paper's sequence "
    "of convex approximations (same fixed point, no cvxpy); heads get their raw gradient, the "
    "authors' code back-propagates Σ α_i L_i and scales head i's by α_i (weighted_heads=True)",
)
class NashMTL(GramianStrategy):
    """Nash-MTL (Navon et al., 2022, Eq. 2 and Sec. 3.2).

    The Nash bargaining solution: ``α > 0`` with ``α_i (G α)_i = 1`` on the raw Gramian
    ``G = J Jᵀ``, update ``Σ_i α_i g_i``. The authors' code divides ``G`` by ``‖G‖_F`` and
    multiplies ``α`` by the same factor in its constraint ``log(α_i ‖G‖_F) + log((G α / ‖G‖_F)_i)
    ≥ 0``, so the normalisation cancels: their ``α`` solves the condition on the raw ``G``, as here.
    The update then has ``‖Σ_i α_i g_i‖² = αᵀ G α = T`` whatever the gradients' scale, and
    ``max_norm`` clips it. The paper reaches that point through a sequence of convex
    approximations solved by cvxpy; the same condition is the stationarity condition of the
    strictly convex ``½ αᵀGα − Σ log α_i``, which :func:`mtlopt.solvers.fair_weights` solves by
    damped Newton steps to machine precision, so no convex-programming dependency is needed.
    For two tasks the result is ``(u_1 + u_2) / √(1 + cos)`` for the unit gradients ``u_i``.

    Args:
        max_norm: clip the combined gradient to this norm (default 1.0, the authors' code).
        update_weights_every: recompute ``α`` every k steps and reuse it in between (default 1).
        weighted_heads: scale each task's own parameters' (head's) gradient by its ``α_i``
            (before clipping, which the authors apply to the shared parameters only), as the
            authors' code does by back-propagating ``Σ α_i L_i`` (default ``False``: raw).
    """

    absent_tasks = (
        "bargaining among the present tasks; an absent task's α is not reused"
    )

    _state_attrs = ("_alpha", "_step")
    _task_state: ClassVar[dict[str, TaskAxes]] = {"_alpha": TaskAxes((0,), np.nan)}

    def __init__(
        self,
        max_norm: float | None = 1.0,
        update_weights_every: int = 1,
        weighted_heads: bool = False,
        num_tasks: int | None = None,
    ):
        super().__init__(num_tasks)
        self.weighted_heads = weighted_heads
        self._alpha_of_call: np.ndarray | None = None
        if update_weights_every < 1:
            raise ValueError("update_weights_every must be at least 1")
        check_max_norm(max_norm)
        self.max_norm = max_norm
        self.update_weights_every = update_weights_every
        self._alpha: np.ndarray | None = None
        self._step = 0

    def hyperparameters(self) -> dict[str, object]:
        return {
            "max_norm": self.max_norm,
            "update_weights_every": self.update_weights_every,
            "weighted_heads": self.weighted_heads,
        }

    def head_weights(self, weights: Tensor) -> Tensor | None:
        if self.weighted_heads and self._alpha_of_call is not None:
            # The authors back-propagate Σ α_i L_i and clip the shared parameters' gradient only.
            return torch.from_numpy(self._alpha_of_call).to(weights)
        return None

    def weigh(self, gramian: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, Commit]:
        reuse = self._alpha is not None and self._step % self.update_weights_every != 0
        if reuse and not np.isnan(self._alpha).any():
            alpha = self._alpha
        else:
            alpha = fair_weights(gramian)
        weights = clip_weights(alpha, gramian, self.max_norm)
        self._alpha_of_call = alpha  # scratch, read by combine() right after
        step = self._step + 1

        def commit() -> None:
            self._alpha, self._step = alpha, step

        return weights, commit
