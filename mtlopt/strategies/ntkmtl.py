"""NTKMTL: balancing task convergence speeds by their NTK eigenvalues."""

from __future__ import annotations

import numpy as np

from ..registry import register
from .base import Commit, GramianStrategy, _noop, check_max_norm, clip_weights


@register(
    "ntkmtl",
    kind="gradient",
    cost="T backward",
    stateful=False,
    paper="Qin et al., NTKMTL: Mitigating Task Imbalance in Multi-Task Learning from Neural "
    "Tangent Kernel Perspective, NeurIPS 2025",
    conventions="one sample per task: w_i = (tr G / G_ii)^0.5 (ntk_exp); the authors' code also "
    "multiplies the update by T (times_tasks=True) and clips it to norm 1 (max_norm=1.0); a zero "
    "row gets weight 0",
)
class NTKMTL(GramianStrategy):
    """NTKMTL (NeurIPS 2025), the parameter-space form with one (mini-batch) sample per task.

    The NTK of task i, ``K_i = J_i J_iᵀ``, reduces to the scalar ``G_ii = ‖g_i‖²`` when each task
    contributes one gradient; its eigenvalue sets the task's convergence speed. Equalising the
    speeds gives ``w_i = (Σ_j λ_j / λ_i)^{ntk_exp} = (tr G / G_ii)^{ntk_exp}`` and the update
    ``Σ_i w_i g_i``: every task's gradient is rescaled to a common norm ``√tr G``.

    Reference code: jianke0604/NTKMTL, ``methods/weight_methods.py`` (``NTKMTL.ntkgrad``,
    ``overwrite_grad``, ``backward``).

    The cheaper variant on the shared representation's per-sample gradients (NTKMTL-SR) is
    ``ntkmtl_sr``.

    Args:
        ntk_exp: exponent of the eigenvalue ratio (default 0.5, the authors' value).
        times_tasks: multiply the update by T, as the authors' code (default False).
        max_norm: then clip the update to this norm (default None; the authors' code: 1.0).
    """

    absent_tasks = "the present rows: tr G runs over the present tasks"

    def __init__(
        self,
        ntk_exp: float = 0.5,
        times_tasks: bool = False,
        max_norm: float | None = None,
        num_tasks: int | None = None,
    ):
        super().__init__(num_tasks)
        check_max_norm(max_norm)
        if not ntk_exp >= 0:
            raise ValueError(f"ntk_exp must be non-negative, got {ntk_exp}")
        self.ntk_exp, self.times_tasks, self.max_norm = ntk_exp, times_tasks, max_norm

    def hyperparameters(self) -> dict[str, object]:
        return {"ntk_exp": self.ntk_exp, "times_tasks": self.times_tasks, "max_norm": self.max_norm}

    def weigh(self, gramian: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, Commit]:
        diagonal = np.clip(np.diag(gramian), 0.0, None)
        trace = diagonal.sum()
        positive = diagonal > 0
        weights = np.zeros(len(diagonal))
        weights[positive] = (trace / diagonal[positive]) ** self.ntk_exp
        if self.times_tasks:
            weights *= len(diagonal)
        return clip_weights(weights, gramian, self.max_norm), _noop
