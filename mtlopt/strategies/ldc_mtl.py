"""LDC-MTL: loss discrepancy control with learned weights (logits variant)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ..registry import register
from ._state import TaskAxes, decode, encode
from .base import LearnedTaskVector, LossStrategy, Scalarized


@register(
    "ldc_mtl",
    kind="loss",
    cost="1 backward",
    stateful=True,
    paper="Xiao et al., LDC-MTL: Balancing Multi-Task Learning through Scalable Loss "
    "Discrepancy Control, arXiv 2502.08585 (2025)",
    conventions="logits variant: free per-task logits (init 0) in place of the paper's router on "
    "the shared features; λ = 0.05 (the authors' NYUv2 script); ratios from the first step's "
    "losses, fixed; no clamp of the weights by default (the authors' 3-task router clamps "
    "softmax to [0.2, 0.8]: clamp=(0.2, 0.8)); logits trained by the wrapped optimizer, no "
    "weight decay",
)
class LDCMTL(LearnedTaskVector, LossStrategy):
    """LDC-MTL (Xiao et al., 2025), with learned logits instead of a router network.

    The losses are pre-normalised once by the first step's ratios ``ρ_i = L_i⁽¹⁾ / min_j
    L_j⁽¹⁾`` (``L̃ = L / ρ``); the weights are ``w = softmax(ξ)`` of learned logits, and one
    backward pass of

    ``L_LDC = wᵀ L̃ / Σ_i w_i + λ Σ_{k=1}^{T−1} |w_k L̃_k − w_{k+1} L̃_{k+1}|``

    trains the model and ξ together: the first-order penalty form of the paper's bilevel problem,
    whose upper level asks the weighted losses to agree (the discrepancies run over consecutive
    tasks in the optimizer's order, as the authors' code).

    Reference code: OptMN-Lab/LDC-MTL, ``experiments/nyuv2/trainer.py`` and the router in
    ``models.py``.

    Args:
        lambda_: discrepancy penalty λ (default 0.05).
        clamp: bounds applied to the softmax weights, or None (default).
    """

    absent_tasks = (
        "softmax and discrepancies over the present tasks (consecutive present tasks); an absent "
        "task's logit gets no gradient; a task's ratio is fixed at its first step"
    )

    linear_in_losses = False
    learned_name = "logits"
    _task_state: ClassVar[dict[str, TaskAxes]] = {"ratios": TaskAxes((0,), np.nan)}

    def __init__(
        self,
        lambda_: float = 0.05,
        clamp: tuple[float, float] | None = None,
        num_tasks: int | None = None,
    ):
        super().__init__(num_tasks)
        if not lambda_ >= 0:
            raise ValueError(f"lambda_ must be non-negative, got {lambda_}")
        if clamp is not None and not (0 <= clamp[0] < clamp[1] <= 1):
            raise ValueError(f"clamp must be (low, high) with 0 ≤ low < high ≤ 1, got {clamp}")
        self.lambda_, self.clamp = lambda_, clamp
        self.ratios: np.ndarray | None = None
        self._reference: float | None = None
        self._init_learned(0.0)

    def hyperparameters(self) -> dict[str, object]:
        return {"lambda_": self.lambda_, "clamp": self.clamp}

    def scalarize(self, losses: Tensor) -> Scalarized:
        t = losses.shape[0]
        observed = losses.detach().double().cpu().numpy()
        reference = self._reference
        if reference is None:
            reference = float(observed.min())
        if not reference > 0:
            raise ValueError(f"ldc_mtl needs positive losses at its first step, got {observed}")
        ratios = np.full(t, np.nan) if self.ratios is None else self.ratios.copy()
        ratios = np.where(np.isnan(ratios), observed / reference, ratios)
        ratios = np.where(ratios > 0, ratios, 1.0)
        scale = torch.from_numpy(1.0 / ratios).to(losses)
        weights = torch.softmax(self.learned_like(losses), dim=0)
        if self.clamp is not None:
            weights = weights.clamp(*self.clamp)

        def objective(values: Tensor, w: Tensor) -> Tensor:
            normalised = values * scale
            weighted = w * normalised
            gaps = weighted[:-1] - weighted[1:]
            # A gap within rounding of its terms counts as zero: at the first step all L̃ are
            # equal, and the sign of a rounding error must not pick the subgradient.
            rounding = 4 * torch.finfo(values.dtype).eps * (weighted[:-1].abs() + weighted[1:].abs())
            penalty = torch.where(gaps.abs() > rounding, gaps.abs(), 0.0).sum()
            return weighted.sum() / w.sum() + self.lambda_ * penalty

        with torch.enable_grad():
            probe = losses.detach().clone().requires_grad_(True)
            (effective,) = torch.autograd.grad(objective(probe, weights.detach()), probe)

        def commit() -> None:
            self.ratios, self._reference = ratios, reference

        return Scalarized(loss=objective(losses, weights), weights=effective.detach(), commit=commit)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["ratios"] = encode(self.ratios)
        state["reference"] = self._reference
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._refuse_other_strategy(state)
        if not {"ratios", "reference"} <= set(state):
            raise KeyError("ldc_mtl state is missing its ratios and reference")
        ratios = decode(state["ratios"])
        if ratios is not None and self.num_tasks is not None and len(ratios) != self.num_tasks:
            raise ValueError(
                f"ldc_mtl state holds ratios for {len(ratios)} tasks, this strategy has "
                f"{self.num_tasks}"
            )
        rest = {k: v for k, v in state.items() if k not in ("ratios", "reference")}
        super().load_state_dict(rest)
        self.ratios, self._reference = ratios, state["reference"]
