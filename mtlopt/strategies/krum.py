"""Krum: Byzantine-robust selection of task gradients."""

from __future__ import annotations

import numpy as np

from ..registry import register
from .base import Commit, GramianStrategy, _noop


@register(
    "krum",
    kind="gradient",
    cost="T backward",
    stateful=False,
    paper="Blanchard et al., Machine Learning with Adversaries: Byzantine Tolerant Gradient "
    "Descent, NeurIPS 2017",
    conventions="scores are sums of squared distances (paper; torchjd sums the distances "
    "themselves: squared=False); n_byzantine=0, n_selected=1; with fewer than n_byzantine + 3 "
    "rows each row is scored over its nearest max(T − f − 2, 1) others (torchjd raises); ties go "
    "to the first task",
)
class Krum(GramianStrategy):
    """Krum (Blanchard et al., 2017, Sec. 4) and Multi-Krum.

    Each row ``g_i`` is scored by ``s(i) = Σ_{j ∈ N_i} ‖g_i − g_j‖²`` over its ``T − f − 2``
    nearest other rows (``f = n_byzantine``); the ``n_selected`` rows of smallest score are
    averaged (``n_selected = 1``: Krum's single choice). Distances come from the Gramian:
    ``‖g_i − g_j‖² = G_ii + G_jj − 2 G_ij``.

    A robust-statistics aggregator from federated learning, here for completeness with torchjd:
    in multi-task learning it follows the majority of tasks and ignores the rest.

    Reference code: torchjd's ``Krum`` (``aggregation/_krum.py``).

    Args:
        n_byzantine: number ``f`` of rows assumed adversarial (default 0).
        n_selected: rows averaged (default 1).
        squared: sum squared distances (paper, default) or the distances (torchjd).
    """

    absent_tasks = "the present rows are scored and selected among themselves"

    def __init__(
        self,
        n_byzantine: int = 0,
        n_selected: int = 1,
        squared: bool = True,
        num_tasks: int | None = None,
    ):
        super().__init__(num_tasks)
        if n_byzantine < 0 or n_selected < 1:
            raise ValueError(
                f"n_byzantine must be ≥ 0 and n_selected ≥ 1, got {n_byzantine}, {n_selected}"
            )
        self.n_byzantine, self.n_selected, self.squared = n_byzantine, n_selected, squared

    def hyperparameters(self) -> dict[str, object]:
        return {
            "n_byzantine": self.n_byzantine,
            "n_selected": self.n_selected,
            "squared": self.squared,
        }

    def weigh(self, gramian: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, Commit]:
        t = gramian.shape[0]
        weights = np.zeros(t)
        if t == 1:
            weights[0] = 1.0
            return weights, _noop
        norms = np.diag(gramian)
        distances = np.clip(norms[:, None] + norms[None, :] - 2 * gramian, 0.0, None)
        if not self.squared:
            distances = np.sqrt(distances)
        np.fill_diagonal(distances, np.inf)
        neighbours = max(t - self.n_byzantine - 2, 1)
        scores = np.sort(distances, axis=1)[:, :neighbours].sum(axis=1)
        chosen = np.argsort(scores, kind="stable")[: min(self.n_selected, t)]
        weights[chosen] = 1.0 / len(chosen)
        return weights, _noop
