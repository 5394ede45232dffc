"""Equal weighting (linear scalarization)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ..registry import register
from .base import Combined, LossStrategy, Scalarized, _as_matrix


@register(
    "ew",
    kind="loss",
    cost="1 backward",
    stateful=False,
    paper="Equal weighting / linear scalarization (the 'LS' baseline of Navon et al., ICML 2022)",
    conventions="reduction='sum' (Σ L_i, as Nash-MTL's LS and LibMTL's EW); 'mean' divides by T",
)
class EW(LossStrategy):
    """Equal weighting: minimise ``Σ_i L_i`` (or the mean with ``reduction="mean"``).

    Args:
        reduction: ``"sum"`` (default, weights 1) or ``"mean"`` (weights 1/T).
    """

    def __init__(self, reduction: Literal["sum", "mean"] = "sum", num_tasks: int | None = None):
        super().__init__(num_tasks)
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction = reduction

    def hyperparameters(self) -> dict[str, object]:
        return {"reduction": self.reduction}

    def _weights(self, num_tasks: int, like: Tensor) -> Tensor:
        value = 1.0 if self.reduction == "sum" else 1.0 / num_tasks
        return torch.full((num_tasks,), value, dtype=like.dtype, device=like.device)

    def scalarize(self, losses: Tensor) -> Scalarized:
        weights = self._weights(losses.shape[0], losses)
        return Scalarized(loss=weights @ losses, weights=weights)

    def aggregate(self, jacobian: Tensor, losses: Tensor | None = None) -> Tensor:
        """The sum (or mean) of the rows of ``J``: EW applied to gradients."""
        return self.combine(_as_matrix(jacobian)).direction

    def combine(self, jacobian: Tensor, losses: Tensor | None = None) -> Combined:
        weights = self._weights(jacobian.shape[0], jacobian)
        return Combined(direction=weights @ jacobian, weights=weights)
