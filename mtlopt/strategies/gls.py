"""GLS: geometric loss strategy."""

from __future__ import annotations

from torch import Tensor

from ..registry import register
from .base import LossStrategy, Scalarized


@register(
    "gls",
    kind="loss",
    cost="1 backward",
    stateful=False,
    paper="Chennupati et al., MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss "
    "Strategy for Multi-Task Learning, CVPR Workshops 2019",
    conventions="geometric mean (Π L_i)^(1/T), computed as exp(mean log L_i); losses must be > 0",
)
class GLS(LossStrategy):
    """Geometric loss strategy (Chennupati et al., 2019, Eq. 2): minimise ``(Π_i L_i)^{1/T}``.

    The effective weight of task i is ``∂/∂L_i = GLS / (T · L_i)``: small losses weigh more.
    """

    absent_tasks = (
        "geometric mean of the present tasks' losses"
    )

    linear_in_losses = False

    def scalarize(self, losses: Tensor) -> Scalarized:
        if bool((losses.detach() <= 0).any()):
            raise ValueError("gls needs strictly positive losses (it takes their logarithm)")
        value = losses.log().mean().exp()
        weights = (value / (losses.shape[0] * losses)).detach()
        return Scalarized(loss=value, weights=weights)
