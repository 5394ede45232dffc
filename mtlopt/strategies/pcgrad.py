"""PCGrad: projecting conflicting gradients."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import numpy as np

from ..registry import register
from .base import Commit, GramianStrategy, Randomized


@register(
    "pcgrad",
    kind="gradient",
    cost="T backward",
    stateful=True,
    paper="Yu et al., Gradient Surgery for Multi-Task Learning, NeurIPS 2020",
    conventions="reduction='sum' (Algorithm 1 of the paper; torchjd, LibMTL, Nash-MTL code); "
    "'mean' matches Pytorch-PCGrad; random task order per task and step, seedable",
)
class PCGrad(Randomized, GramianStrategy):
    """PCGrad (Yu et al., 2020, Algorithm 1).

    For every task i, in a random order of the other tasks j, whenever ``g_i^PC · g_j < 0`` project
    ``g_i^PC ← g_i^PC − (g_i^PC · g_j / ‖g_j‖²) g_j``; the update is ``Σ_i g_i^PC``.

    Every projected gradient stays in the span of the task gradients, so the projection runs on the
    coefficients ``c_i`` (``g_i^PC = c_iᵀ J``) using only the Gramian: O(T²) scalar work instead of
    O(T² P) vector work.

    Args:
        reduction: ``"sum"`` (paper, default) or ``"mean"`` of the projected gradients.
        seed: seed of the strategy's own generator (saved in ``state_dict``); ``None`` draws one
            from torch's global generator.
    """

    absent_tasks = (
        "each present task is projected against the other present tasks, in random order"
    )

    _state_attrs = ("_rng_state",)

    def __init__(
        self,
        reduction: Literal["sum", "mean"] = "sum",
        seed: int | None = None,
        num_tasks: int | None = None,
    ):
        super().__init__(num_tasks)
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction = reduction
        self._init_rng(seed)

    def hyperparameters(self) -> dict[str, object]:
        return {"reduction": self.reduction}

    def weigh(self, gramian: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, Commit]:
        rng, commit = self._step_rng()
        t = gramian.shape[0]
        orders = [rng.permutation(np.delete(np.arange(t), i)) for i in range(t)]
        weights = project_conflicting(gramian, orders).sum(axis=0)
        if self.reduction == "mean":
            weights /= t
        return weights, commit


def project_conflicting(gramian: np.ndarray, orders: list[np.ndarray]) -> np.ndarray:
    """PCGrad's projected gradients as coefficients: row i holds ``c_i`` with ``g_i^PC = c_iᵀ J``.

    ``orders[i]`` is the order in which task i is projected against the other tasks. Every task's
    projections are independent of the others', so the T sequences advance together: at round k,
    task i meets ``orders[i][k]``, with ``M = C G`` kept up to date (``⟨g_i', g_j⟩ = M_ij``), which
    makes the whole pass O(T³) in T vector operations instead of T² scalar steps.
    """
    t = gramian.shape[0]
    squared_norms = np.diag(gramian)
    coefficients = np.eye(t)
    products = gramian.copy()  # C G
    tasks = np.arange(t)
    for partners, present in visiting_rounds(orders, t):
        dots = products[tasks, partners]
        norms = squared_norms[partners]
        conflicting = present & (dots < 0.0) & (norms > 0.0)
        steps = np.where(conflicting, dots / np.where(norms > 0.0, norms, 1.0), 0.0)
        coefficients[tasks, partners] -= steps
        products -= steps[:, None] * gramian[partners]
    return coefficients


def visiting_rounds(orders: list[np.ndarray], t: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Round k of the T visiting sequences: each task's k-th partner, and whether it has one (a
    shorter sequence is over; its partner is then the task itself, to be ignored)."""
    length = max((len(order) for order in orders), default=0)
    partners = np.tile(np.arange(t)[:, None], (1, length))
    present = np.zeros((t, length), dtype=bool)
    for i, order in enumerate(orders):
        partners[i, : len(order)] = order
        present[i, : len(order)] = True
    return zip(partners.T, present.T, strict=True)
