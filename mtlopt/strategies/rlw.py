"""RLW: random loss weighting."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..registry import register
from .base import LossStrategy, Randomized, Scalarized


@register(
    "rlw",
    kind="loss",
    cost="1 backward",
    stateful=True,
    paper="Lin et al., Reasonable Effectiveness of Random Weighting: A Litmus Test for "
    "Multi-Task Learning, TMLR 2022",
    conventions="w = softmax(ε), ε ~ N(0, I) each step (weights sum to 1, as the paper, LibMTL and "
    "Nash-MTL's code); seeded generator saved in state_dict",
)
class RLW(Randomized, LossStrategy):
    """Random loss weighting (Lin et al., 2022, Sec. 3): fresh weights ``softmax(ε)`` every step.

    Args:
        seed: seed of the strategy's generator (``None``: drawn from torch's global generator).
    """

    absent_tasks = (
        "softmax of one normal draw per present task"
    )

    _state_attrs = ("_rng_state",)

    def __init__(self, seed: int | None = None, num_tasks: int | None = None):
        super().__init__(num_tasks)
        self._init_rng(seed)

    def scalarize(self, losses: Tensor) -> Scalarized:
        rng, commit = self._step_rng()
        logits = rng.standard_normal(losses.shape[0])
        exp = np.exp(logits - logits.max())
        weights = torch.from_numpy(exp / exp.sum()).to(losses)
        return Scalarized(loss=weights @ losses, weights=weights, commit=commit)
