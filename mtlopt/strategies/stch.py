"""STCH: smooth Tchebycheff scalarization."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..registry import register
from .base import LossStrategy, Scalarized


@register(
    "stch",
    kind="loss",
    cost="1 backward",
    stateful=False,
    paper="Lin et al., Smooth Tchebycheff Scalarization for Multi-Objective Optimization, ICML 2024",
    conventions="mu=1, preference λ = 1 and ideal point z* = 0 by default (Eq. 5 as stated); "
    "LibMTL's variant on log-normalised losses is not the default",
)
class STCH(LossStrategy):
    """Smooth Tchebycheff scalarization (Lin et al., 2024, Eq. 5).

    ``g_μ(L) = μ log Σ_i exp(λ_i (L_i − z_i*) / μ)``: a smooth maximum of the weighted losses,
    which tends to the Tchebycheff ``max_i λ_i (L_i − z_i*)`` as ``μ → 0``. The effective weights are
    ``λ_i softmax_i(λ (L − z*) / μ)``.

    Args:
        mu: smoothing temperature (default 1).
        preference: λ, one positive value per task (default all 1).
        ideal: the ideal point z*, one value per task (default 0).
    """

    absent_tasks = (
        "smooth maximum over the present tasks (their preference and ideal entries)"
    )

    linear_in_losses = False

    def __init__(
        self,
        mu: float = 1.0,
        preference: Sequence[float] | None = None,
        ideal: Sequence[float] | None = None,
        num_tasks: int | None = None,
    ):
        super().__init__(num_tasks)
        if mu <= 0:
            raise ValueError(f"mu must be positive, got {mu}")
        self.mu = mu
        self.preference = None if preference is None else list(preference)
        self.ideal = None if ideal is None else list(ideal)

    def hyperparameters(self) -> dict[str, object]:
        return {"mu": self.mu, "preference": self.preference, "ideal": self.ideal}

    def scalarize(self, losses: Tensor) -> Scalarized:
        pref = (
            torch.ones_like(losses)
            if self.preference is None
            else losses.new_tensor(self.present_entries(self.preference))
        )
        ideal = (
            torch.zeros_like(losses)
            if self.ideal is None
            else losses.new_tensor(self.present_entries(self.ideal))
        )
        scaled = pref * (losses - ideal) / self.mu
        loss = self.mu * torch.logsumexp(scaled, dim=0)
        weights = (pref * torch.softmax(scaled, dim=0)).detach()
        return Scalarized(loss=loss, weights=weights)
