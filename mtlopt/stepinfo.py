"""``StepInfo``: the diagnostics of one step, one entry per task of the optimizer."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .tasks import StepTasks


@dataclass
class StepInfo:
    """Diagnostics of the last optimizer step (``MTLOptimizer.last_step``).

    Per-task tensors hold one entry per task of the optimizer, in its order (``task_names``); an
    entry of a task absent from the step is NaN.
    """

    task_names: list[str]
    losses: Tensor
    """Detached task losses (summed over the micro-batches of the step)."""
    weights: Tensor | None = None
    """Effective task weights chosen by the strategy (``None`` for non-linear gradient methods)."""
    gradient_norms: Tensor | None = None
    """‖g_i‖ of each task's shared gradient (gradient strategies)."""
    cosines: Tensor | None = None
    """T×T cosine similarities of the task gradients (gradient strategies)."""
    skipped: bool = False
    """True when the step was skipped because of a non-finite loss or gradient (``nonfinite='skip'``)."""
    reason: str = ""
    present: list[str] = field(default_factory=list)
    """The tasks that had a loss in this step."""
    engine: str | None = None
    """How a gradient strategy's step got its task gradients: ``"gramian"`` where the Gramian
    engine took it (``G`` without ``J``, :mod:`mtlopt.autogram`), ``"chunked"`` where ``G`` was
    formed k rows of ``J`` at a time (``jacobian_rows=k``, :mod:`mtlopt.chunked`), ``"jacobian"``
    for ``J``."""

    def as_dict(self) -> dict[str, Any]:
        """Plain Python numbers keyed by task name (present tasks only), for loggers."""
        out: dict[str, Any] = {"skipped": self.skipped}
        present = set(self.present or self.task_names)
        for i, name in enumerate(self.task_names):
            if name not in present:
                continue
            out[f"loss/{name}"] = float(self.losses[i])
            if self.weights is not None:
                out[f"weight/{name}"] = float(self.weights[i])
            if self.gradient_norms is not None:
                out[f"grad_norm/{name}"] = float(self.gradient_norms[i])
        if self.cosines is not None:
            for i, a in enumerate(self.task_names):
                for j in range(i + 1, len(self.task_names)):
                    b = self.task_names[j]
                    if a in present and b in present:
                        out[f"cos/{a}~{b}"] = float(self.cosines[i, j])
        return out


def spread(weights: Tensor, step: StepTasks, present: np.ndarray | None = None) -> Tensor:
    """Per-present-task weights as one entry per task (NaN for absent tasks)."""
    present = step.present if present is None else present
    if len(present) == len(step.names):
        return weights
    full = torch.full((len(step.names),), math.nan, dtype=weights.dtype, device=weights.device)
    full[torch.as_tensor(present, device=weights.device)] = weights
    return full
