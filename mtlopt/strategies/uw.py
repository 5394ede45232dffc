"""UW: uncertainty weighting."""

from __future__ import annotations

import torch
from torch import Tensor

from ..registry import register
from .base import LearnedTaskVector, LossStrategy, Scalarized


@register(
    "uw",
    kind="loss",
    cost="1 backward",
    stateful=True,
    paper="Kendall et al., Multi-Task Learning Using Uncertainty to Weigh Losses, CVPR 2018",
    conventions="regression form for every task; log-variances s_i initialised to 0 (σ = 1, as the "
    "Nash-MTL code; LibMTL uses −0.5); s trained by the wrapped optimizer without weight decay",
)
class UW(LearnedTaskVector, LossStrategy):
    """Uncertainty weighting (Kendall et al., 2018, Eq. 7).

    Minimises ``Σ_i ½ e^{−s_i} L_i + ½ s_i`` with learnable log-variances ``s_i = log σ_i²``. The
    ``s_i`` are parameters of the strategy that :class:`~mtlopt.MTLOptimizer` adds to the wrapped
    optimizer as their own group (weight decay 0). An absent task's
    term is left out and its ``s_i`` gets no gradient.

    Args:
        num_tasks: number of tasks (optional: the optimizer sets it at the first step).
        init: initial value of every ``s_i`` (default 0).
    """

    absent_tasks = (
        "the present terms only; an absent task's s_i gets no gradient (its optimizer "
        "state does not move)"
    )

    learned_name = "log_vars"

    def __init__(self, num_tasks: int | None = None, init: float = 0.0):
        super().__init__(num_tasks)
        self.init = init
        self._init_learned(init)

    def hyperparameters(self) -> dict[str, object]:
        return {"num_tasks": self.num_tasks, "init": self.init}

    def scalarize(self, losses: Tensor) -> Scalarized:
        log_vars = self.learned_like(losses)
        weights = 0.5 * torch.exp(-log_vars)
        return Scalarized(
            loss=(weights * losses).sum() + 0.5 * log_vars.sum(), weights=weights.detach()
        )
