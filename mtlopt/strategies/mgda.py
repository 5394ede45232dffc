"""MGDA: the multiple-gradient descent algorithm for multi-task learning."""

from __future__ import annotations

from typing import Literal

import numpy as np
from torch import Tensor

from ..registry import register
from ..solvers import min_norm_simplex
from .base import Commit, GramianStrategy, _noop

Normalization = Literal["none", "l2", "loss", "loss+"]


@register(
    "mgda",
    kind="gradient",
    cost="T backward",
    stateful=False,
    paper="Sener & Koltun, Multi-Task Learning as Multi-Objective Optimization, NeurIPS 2018",
    conventions="exact min-norm solver (active set on the support, Wolfe's method as fallback) "
    "instead of Frank-Wolfe; weights on the simplex; "
    "normalization='none'; with normalization the weights multiply the raw gradients (official "
    "code); heads get their raw gradient, the authors' code back-propagates Σ α_i L_i and scales "
    "head i's by α_i (weighted_heads=True)",
)
class MGDA(GramianStrategy):
    """MGDA (Sener & Koltun, 2018, Eq. 3 and Algorithm 2).

    Finds the min-norm element of the convex hull of the task gradients,
    ``min_{α ∈ Δ} ‖Σ_i α_i g_i‖²``, solved exactly from the Gramian
    (:func:`~mtlopt.solvers.min_norm_simplex`: an active-set method on the support, with Wolfe's
    algorithm as its fallback). The direction is a common descent direction:
    ``d · g_i ≥ ‖d‖² ≥ 0`` for every task.

    Args:
        normalization: rescaling of the gradients before the solve, as in the authors' code:
            ``"none"`` (default), ``"l2"`` (‖g_i‖), ``"loss"`` (L_i), ``"loss+"`` (L_i · ‖g_i‖).
            The solution ``α`` multiplies the raw gradients, as the authors' code re-weights the
            raw losses with it (LibMTL instead combines the normalized gradients).
        weighted_heads: scale each task's own parameters' (head's) gradient by its ``α_i``, as
            the authors' code does by back-propagating ``Σ α_i L_i`` (default ``False``: heads
            get their raw task gradient, the convention of every other gradient strategy).
    """

    def __init__(
        self,
        normalization: Normalization = "none",
        weighted_heads: bool = False,
        num_tasks: int | None = None,
    ):
        super().__init__(num_tasks)
        self.weighted_heads = weighted_heads
        if normalization not in ("none", "l2", "loss", "loss+"):
            raise ValueError(f"unknown normalization {normalization!r}")
        self.normalization = normalization

    def hyperparameters(self) -> dict[str, object]:
        return {"normalization": self.normalization, "weighted_heads": self.weighted_heads}

    def head_weights(self, weights: Tensor) -> Tensor | None:
        # The authors back-propagate Σ α_i L_i: head i's gradient is scaled by α_i.
        return weights if self.weighted_heads else None

    def weigh(self, gramian: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, Commit]:
        scales = self._scales(gramian, losses)
        alpha = min_norm_simplex(gramian / np.outer(scales, scales))
        return alpha, _noop

    def _scales(self, gramian: np.ndarray, losses: np.ndarray | None) -> np.ndarray:
        norms = np.sqrt(np.clip(np.diag(gramian), 0.0, None))
        if self.normalization == "none":
            scales = np.ones_like(norms)
        elif self.normalization == "l2":
            scales = norms
        else:
            if losses is None:
                raise ValueError(f"normalization={self.normalization!r} needs the task losses")
            scales = losses if self.normalization == "loss" else losses * norms
        return np.where(scales > 0, scales, 1.0)
