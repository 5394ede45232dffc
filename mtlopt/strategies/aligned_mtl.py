"""Aligned-MTL: independent component alignment."""

from __future__ import annotations

from typing import Literal

import numpy as np

from ..registry import register
from .base import Commit, GramianStrategy, _noop

ScaleMode = Literal["min", "median", "lower_median", "rmse"]


@register(
    "aligned_mtl",
    kind="gradient",
    cost="T backward",
    stateful=False,
    paper="Senushkin et al., Independent Component Alignment for Multi-Task Learning, CVPR 2023",
    conventions="scale_mode='min' (paper); reduction='mean' of the aligned gradients (torchjd; "
    "LibMTL sums: reduction='sum'); 'median' is numpy's median of the singular values (mean of the "
    "two middle ones for an even rank), torch's lower middle value is "
    "scale_mode='lower_median' (up to 2.5× apart); eigenvalues below max(1e-10, T√P·ε)·λ_max (ε "
    "of J's dtype: the Gramian's rounding) are treated as zero, the authors' code cuts at "
    "T·ε_float32·λ_max",
)
class AlignedMTL(GramianStrategy):
    """Aligned-MTL (Senushkin et al., 2023, Eqs. 8–10).

    Makes the gradient system well conditioned: with ``G = V Λ Vᵀ`` (rank r), the aligned system
    ``Ĵ = σ V Λ^{-1/2} Vᵀ J`` has all its singular values equal to ``σ``; the update is
    the mean (or sum) of the rows of ``Ĵ``, i.e. weights ``w = (σ/T) V Λ^{-1/2} Vᵀ 1``. ``σ`` is the
    smallest (``"min"``), median (``"median"``; ``"lower_median"`` takes the lower of the two
    middle values for an even rank, as ``torch.median``) or root-mean-square (``"rmse"``) singular
    value of ``J``.

    The rank ``r`` counts the eigenvalues of ``G`` above ``max(1e-10, T √P ε) λ_max``, where
    ``T √P ε`` (ε of ``J``'s dtype) bounds the rounding of a Gramian computed in that dtype: in
    float32 a rank-deficient ``J`` leaves eigenvalues of ``1e-10…1e-7 λ_max`` that are rounding
    only, and taking one of them for ``σ_min`` would shrink the update by orders of magnitude.

    Args:
        scale_mode: ``"min"`` (default), ``"median"``, ``"lower_median"`` or ``"rmse"``.
        reduction: ``"mean"`` (default, torchjd) or ``"sum"`` (LibMTL) of the aligned gradients.
    """

    def __init__(
        self,
        scale_mode: ScaleMode = "min",
        reduction: Literal["mean", "sum"] = "mean",
        num_tasks: int | None = None,
    ):
        super().__init__(num_tasks)
        if scale_mode not in ("min", "median", "lower_median", "rmse"):
            raise ValueError(
                f"scale_mode must be 'min', 'median', 'lower_median' or 'rmse', got {scale_mode!r}"
            )
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.scale_mode = scale_mode
        self.reduction = reduction

    def hyperparameters(self) -> dict[str, object]:
        return {"scale_mode": self.scale_mode, "reduction": self.reduction}

    def weigh(self, gramian: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, Commit]:
        return self.weigh_at_precision(gramian, losses, 0.0)

    def weigh_at_precision(
        self, gramian: np.ndarray, losses: np.ndarray | None, rounding: float
    ) -> tuple[np.ndarray, Commit]:
        eigenvalues, eigenvectors = np.linalg.eigh(gramian)
        top = float(eigenvalues.max(initial=0.0))
        if not top > 0:
            return np.zeros(gramian.shape[0]), _noop
        keep = eigenvalues > max(1e-10, rounding) * top
        lam, vectors = eigenvalues[keep], eigenvectors[:, keep]
        singular = np.sqrt(lam)  # ascending
        sigma = {
            "min": singular[0],
            "median": np.median(singular),
            "lower_median": singular[(len(singular) - 1) // 2],
            "rmse": np.sqrt(lam.mean()),
        }[self.scale_mode]
        weights = sigma * vectors @ ((vectors.T @ np.ones(len(gramian))) / singular)
        if self.reduction == "mean":
            weights /= len(gramian)
        return weights, _noop
