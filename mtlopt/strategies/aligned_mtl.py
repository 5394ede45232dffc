"""Aligned-MTL: independent component alignment."""

from __future__ import annotations

from typing import Literal

import numpy as np

from ..registry import register
from .base import Commit, GramianStrategy, _noop


@register(
    "aligned_mtl",
    kind="gradient",
    cost="T backward",
    stateful=False,
    paper="Senushkin et al., Independent Component Alignment for Multi-Task Learning, CVPR 2023",
    conventions="scale_mode='min' (paper); reduction='mean' of the aligned gradients (torchjd; "
    "LibMTL sums: reduction='sum'); eigenvalues below 1e-10·λ_max are treated as zero",
)
class AlignedMTL(GramianStrategy):
    """Aligned-MTL (Senushkin et al., 2023, Eqs. 8–10).

    Makes the gradient system well conditioned: with ``G = V Λ Vᵀ`` (rank r), the aligned system
    ``Ĵ = σ V Λ^{-1/2} Vᵀ J`` has all its singular values equal to ``σ``; the update is
    the mean (or sum) of the rows of ``Ĵ``, i.e. weights ``w = (σ/T) V Λ^{-1/2} Vᵀ 1``. ``σ`` is the
    smallest (``"min"``), median (``"median"``) or root-mean-square (``"rmse"``) singular value of
    ``J``.

    Args:
        scale_mode: ``"min"`` (default), ``"median"`` or ``"rmse"``.
        reduction: ``"mean"`` (default, torchjd) or ``"sum"`` (LibMTL) of the aligned gradients.
    """

    def __init__(
        self,
        scale_mode: Literal["min", "median", "rmse"] = "min",
        reduction: Literal["mean", "sum"] = "mean",
        num_tasks: int | None = None,
    ):
        super().__init__(num_tasks)
        if scale_mode not in ("min", "median", "rmse"):
            raise ValueError(f"scale_mode must be 'min', 'median' or 'rmse', got {scale_mode!r}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.scale_mode = scale_mode
        self.reduction = reduction

    def hyperparameters(self) -> dict[str, object]:
        return {"scale_mode": self.scale_mode, "reduction": self.reduction}

    def weigh(self, gramian: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, Commit]:
        eigenvalues, eigenvectors = np.linalg.eigh(gramian)
        top = float(eigenvalues.max(initial=0.0))
        if not top > 0:
            return np.zeros(gramian.shape[0]), _noop
        keep = eigenvalues > 1e-10 * top
        lam, vectors = eigenvalues[keep], eigenvectors[:, keep]
        sigma = {
            "min": np.sqrt(lam.min()),
            "median": np.sqrt(np.median(lam)),
            "rmse": np.sqrt(lam.mean()),
        }[self.scale_mode]
        weights = sigma * vectors @ ((vectors.T @ np.ones(len(gramian))) / np.sqrt(lam))
        if self.reduction == "mean":
            weights /= len(gramian)
        return weights, _noop
