"""TrimmedMean: coordinate-wise trimmed mean of the task gradients."""

from __future__ import annotations

from torch import Tensor

from ..registry import register
from .base import Combined, GradientStrategy


@register(
    "trimmed_mean",
    kind="gradient",
    cost="T backward",
    stateful=False,
    paper="Yin et al., Byzantine-Robust Distributed Learning: Towards Optimal Statistical "
    "Rates, ICML 2018",
    conventions="trim_number=1 per side; with fewer than 2·trim_number + 1 rows the trim shrinks "
    "to (T − 1) // 2 (torchjd raises); not a weighting: no task weights are reported",
)
class TrimmedMean(GradientStrategy):
    """Coordinate-wise trimmed mean (Yin et al., 2018, Option II).

    In every coordinate the ``trim_number`` largest and the ``trim_number`` smallest of the T
    entries are removed and the rest averaged. Not linear in the rows (each coordinate drops
    different tasks), so no task weights exist; a robust-statistics aggregator, here for
    completeness with torchjd.

    Reference code: torchjd's ``TrimmedMean`` (``aggregation/_trimmed_mean.py``).

    Args:
        trim_number: entries removed at each end of every coordinate (default 1).
    """

    absent_tasks = "the present rows are trimmed and averaged"

    def __init__(self, trim_number: int = 1, num_tasks: int | None = None):
        super().__init__(num_tasks)
        if trim_number < 0:
            raise ValueError(f"trim_number must be non-negative, got {trim_number}")
        self.trim_number = trim_number

    def hyperparameters(self) -> dict[str, object]:
        return {"trim_number": self.trim_number}

    def combine(self, jacobian: Tensor, losses: Tensor | None = None) -> Combined:
        t = jacobian.shape[0]
        trim = min(self.trim_number, (t - 1) // 2)
        kept = jacobian.sort(dim=0).values[trim : t - trim] if trim else jacobian
        return Combined(direction=kept.mean(dim=0), weights=None)
