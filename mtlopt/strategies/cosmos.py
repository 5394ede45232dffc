"""COSMOS: linear scalarization with a cosine penalty toward a preference vector."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..registry import register
from .base import LossStrategy, Scalarized


@register(
    "cosmos",
    kind="loss",
    cost="1 backward",
    stateful=False,
    paper="Ruchte & Grabocka, Scalable Pareto Front Approximation for Deep Multi-Objective "
    "Learning, ICDM 2021",
    conventions="preference r = 1 per task and λ = 1 by default (the paper tunes λ from 0.01 to 8 "
    "and samples r ~ Dirichlet per batch, conditioning the model on r: that conditioning is a "
    "model change, left to the user, who then sets .preference before each step); the objective "
    "alone, as torchjd's COSMOS",
)
class COSMOS(LossStrategy):
    """COSMOS (Ruchte & Grabocka, 2021, Eq. 4).

    ``L = Σ_i r_i L_i − λ cos(r, L)``, with ``cos(r, L) = rᵀL / (‖r‖ ‖L‖)``: the linear
    scalarization along the preference ``r`` plus a reward for a loss vector aligned with ``r``,
    which spreads the solutions of different preferences along the Pareto front. The effective
    weights are ``r − λ (r / (‖r‖‖L‖) − (rᵀL) L / (‖r‖‖L‖³))``.

    Reference code: torchjd's ``COSMOS`` scalarizer (the objective only).

    Args:
        preference: ``r``, one non-negative value per task (default all 1).
        lambda_: cosine penalty λ ≥ 0 (default 1).
    """

    absent_tasks = "the present tasks' losses and preference entries"

    linear_in_losses = False

    def __init__(
        self,
        preference: Sequence[float] | None = None,
        lambda_: float = 1.0,
        num_tasks: int | None = None,
    ):
        super().__init__(num_tasks)
        if not lambda_ >= 0:
            raise ValueError(f"lambda_ must be non-negative, got {lambda_}")
        if preference is not None and (
            not len(preference) or any(not float(p) >= 0 for p in preference)
        ):
            raise ValueError(f"preference must hold non-negative values, got {preference}")
        self.preference = None if preference is None else [float(p) for p in preference]
        self.lambda_ = lambda_

    def hyperparameters(self) -> dict[str, object]:
        return {"preference": self.preference, "lambda_": self.lambda_}

    def scalarize(self, losses: Tensor) -> Scalarized:
        r = (
            torch.ones_like(losses)
            if self.preference is None
            else losses.new_tensor(self.present_entries(self.preference))
        )

        def objective(values: Tensor) -> Tensor:
            norm = torch.linalg.vector_norm(values) * torch.linalg.vector_norm(r)
            cosine = (r @ values) / torch.clamp(norm, min=torch.finfo(values.dtype).tiny)
            return r @ values - self.lambda_ * cosine

        return Scalarized(loss=objective(losses), weights=effective_weights(objective, losses))


def effective_weights(objective, losses: Tensor) -> Tensor:
    """``∂objective/∂L_i`` at the current losses (on a detached copy: no graph is kept)."""
    with torch.enable_grad():
        values = losses.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(values), values)
    return grad.detach()
