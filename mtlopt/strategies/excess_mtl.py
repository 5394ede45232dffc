"""ExcessMTL: task weights from estimated excess risks."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from ..registry import register
from ._state import TaskAxes
from .base import Combined, GradientStrategy


@register(
    "excess_mtl",
    kind="gradient",
    cost="T backward",
    stateful=True,
    paper="He et al., Robust Multi-Task Learning with Excess Risks, ICML 2024",
    conventions="robust_step_size η = 1e-2 (LibMTL's default; torchjd 1.0); weights start at 1 "
    "and are renormalised to sum to T, the first step sets the baseline excess risks without "
    "updating the weights (the official code as LibMTL carries it; torchjd starts at 1/T and "
    "updates at once); warmup=0 (the paper's Appendix C.1 averages the baseline over 3 epochs: "
    "warmup = steps)",
)
class ExcessMTL(GradientStrategy):
    """ExcessMTL (He et al., 2024, Eqs. 6–9).

    Each task's excess risk is estimated by a second-order expansion with an AdaGrad-diagonal
    Hessian: ``S_i ← S_i + g_i ⊙ g_i``, ``e_i = Σ_p g_ip² / √(S_ip + 10⁻⁷)`` (Eqs. 6–7). The first
    estimates (or their average over ``warmup`` steps) are the baseline ``e⁰``; afterwards the
    weights take an exponentiated-gradient step ``w_i ← w_i exp(η e_i / e⁰_i)``, renormalised to
    sum to T (Eq. 9). The update is ``Σ_i w_i g_i``. ``S`` is a persistent T×P buffer in the
    gradients' dtype (as in the official code) that follows each shared parameter when the shared
    set changes; each ``e_i`` is summed in float64.

    Reference code: yifei-he/ExcessMTL as carried by LibMTL's ``weighting/ExcessMTL.py``;
    torchjd's ``ExcessMTL``.

    Args:
        robust_step_size: η (default 1e-2).
        warmup: steps whose excess risks are averaged into the baseline, with the weights held at
            1 (default 0: the first step is the baseline).
    """

    absent_tasks = (
        "present rows; an absent task's squared-gradient sums, baseline and weight are not "
        "advanced; the present weights are renormalised to sum to the number present"
    )

    supports_representation = False  # S needs a fixed P
    _state_attrs = ("squared_sums", "weights", "baseline", "_warmup_sum", "_seen")
    _task_state: ClassVar[dict[str, TaskAxes]] = {
        "squared_sums": TaskAxes((0,), 0.0),
        "weights": TaskAxes((0,), 1.0),
        "baseline": TaskAxes((0,), np.nan),
        "_warmup_sum": TaskAxes((0,), 0.0),
        "_seen": TaskAxes((0,), 0.0),
    }

    def __init__(self, robust_step_size: float = 1e-2, warmup: int = 0, num_tasks: int | None = None):
        super().__init__(num_tasks)
        if not robust_step_size > 0 or warmup < 0:
            raise ValueError("robust_step_size must be positive and warmup non-negative")
        self.robust_step_size, self.warmup = robust_step_size, warmup
        self.squared_sums: Tensor | None = None
        self.weights: np.ndarray | None = None
        self.baseline: np.ndarray | None = None
        self._warmup_sum: np.ndarray | None = None
        self._seen: np.ndarray | None = None

    def hyperparameters(self) -> dict[str, object]:
        return {"robust_step_size": self.robust_step_size, "warmup": self.warmup}

    def remap_columns(self, mapping: Tensor) -> None:
        if self.squared_sums is None:
            return
        keep = mapping >= 0
        sums = self.squared_sums.new_zeros(self.squared_sums.shape[0], mapping.numel())
        sums[:, keep.to(sums.device)] = self.squared_sums[:, mapping[keep].to(sums.device)]
        self.squared_sums = sums

    def combine(self, jacobian: Tensor, losses: Tensor | None = None) -> Combined:
        t = jacobian.shape[0]
        squared = jacobian.square()
        previous = self.squared_sums
        if previous is not None and previous.shape != squared.shape:
            raise ValueError(
                f"excess_mtl's sums have shape {tuple(previous.shape)}, J has {tuple(squared.shape)}"
            )
        sums = squared if previous is None else previous.to(squared) + squared
        scaled = sums.add(1e-7).rsqrt_().mul_(squared)
        excess = scaled.sum(dim=1, dtype=torch.float64).cpu().numpy()
        seen = np.zeros(t) if self._seen is None else self._seen
        weights = np.ones(t) if self.weights is None else self.weights.copy()
        baseline = np.full(t, np.nan) if self.baseline is None else self.baseline.copy()
        warm = np.zeros(t) if self._warmup_sum is None else self._warmup_sum.copy()
        in_warmup = seen < self.warmup
        warm[in_warmup] += excess[in_warmup]
        # The baseline is set on a task's first step after its warm-up (the average of its warm-up
        # excess risks, or that step's own excess risk without warm-up); the weights move after.
        starting = ~in_warmup & np.isnan(baseline)
        if self.warmup > 0:
            baseline[starting] = warm[starting] / self.warmup
        else:
            baseline[starting] = excess[starting]
        moving = ~in_warmup & ~(starting & (self.warmup == 0))
        ratio = np.where(moving, excess / (baseline + 1e-7), 0.0)
        log_w = np.log(np.maximum(weights, 1e-300)) + self.robust_step_size * ratio
        new = np.exp(log_w - log_w.max())
        new = t * new / new.sum()
        w = torch.from_numpy(new).to(jacobian)

        def commit() -> None:
            self.squared_sums, self.weights, self.baseline = sums, new, baseline
            self._warmup_sum, self._seen = warm, seen + 1

        return Combined(direction=w @ jacobian, weights=w, commit=commit)
