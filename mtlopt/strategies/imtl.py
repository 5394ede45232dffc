"""IMTL: impartial multi-task learning (IMTL-G, IMTL-L and the hybrid IMTL)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..registry import register
from .base import Commit, GramianStrategy, LearnedTaskVector, LossStrategy, Scalarized, _noop


def imtl_g_weights(gramian: np.ndarray, rounding: float = 0.0) -> np.ndarray:
    """IMTL-G (Liu et al., 2021, Eq. 12–14) from the Gramian alone.

    The update ``d = Σ_i α_i g_i`` with ``Σ_i α_i = 1`` has equal projections ``d·u_i = λ`` on the
    unit gradients ``u_i = g_i/n_i`` (``n_i = ‖g_i‖``), i.e. ``G α = λ n``, so ``α = G⁻¹ n / (1ᵀ
    G⁻¹ n)``: for independent gradients the paper's closed form (Eq. 14) rewritten with ``G``.
    For dependent gradients ``G⁺`` (eigenvalues of ``G`` below ``max(1e-10, rounding) λ_max``
    dropped) gives the least-squares solution, which unlike Eq. 14's choice of task 1 as pivot
    does not depend on the order of the tasks. Weights are zero when ``1ᵀ G⁺ n`` vanishes.
    """
    t = gramian.shape[0]
    if t == 1:
        return np.ones(1)
    norms = np.sqrt(np.clip(np.diag(gramian), 0.0, None))
    eigenvalues, eigenvectors = np.linalg.eigh(gramian)
    top = float(eigenvalues.max(initial=0.0))
    if not top > 0:
        return np.full(t, 1.0 / t)
    keep = eigenvalues > max(1e-10, rounding) * top
    lam, vectors = eigenvalues[keep], eigenvectors[:, keep]
    unnormalised = vectors @ ((vectors.T @ norms) / lam)
    total = float(unnormalised.sum())
    if not abs(total) > 1e-12 * float(np.abs(unnormalised).sum()):
        return np.zeros(t)
    return unnormalised / total


@register(
    "imtl_g",
    kind="gradient",
    cost="T backward",
    stateful=False,
    paper="Liu et al., Towards Impartial Multi-task Learning, ICLR 2021 (IMTL-G)",
    conventions="weights sum to 1; α ∝ G⁺‖g‖ (Eq. 14 for independent gradients; for dependent ones "
    "the pseudo-inverse's least-squares solution, independent of the task order, where LibMTL's "
    "Eq. 14 pivots on task 1); eigenvalues below max(1e-10, T√P·ε)·λ_max dropped",
)
class IMTLG(GramianStrategy):
    """IMTL-G (Liu et al., 2021, Sec. 3.2): the update whose projections onto every unit task
    gradient are equal, ``Σ_i α_i g_i`` with ``Σ_i α_i = 1``."""

    def weigh(self, gramian: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, Commit]:
        return imtl_g_weights(gramian), _noop

    def weigh_at_precision(
        self, gramian: np.ndarray, losses: np.ndarray | None, rounding: float
    ) -> tuple[np.ndarray, Commit]:
        return imtl_g_weights(gramian, rounding), _noop


class _LossScales(LearnedTaskVector):
    """IMTL-L's learnable log-scales ``s``: each loss becomes ``e^{s} L − s`` (Eq. 4)."""

    learned_name = "log_scales"

    def scale_losses(self, losses: Tensor, index: int | slice = slice(None)) -> Tensor:
        s = self.learned_like(losses)[index]
        return torch.exp(s) * losses - s


@register(
    "imtl_l",
    kind="loss",
    cost="1 backward",
    stateful=True,
    paper="Liu et al., Towards Impartial Multi-task Learning, ICLR 2021 (IMTL-L)",
    conventions="log-scales initialised to 0, trained by the wrapped optimizer (no weight decay)",
)
class IMTLL(_LossScales, LossStrategy):
    """IMTL-L (Liu et al., 2021, Sec. 3.1): minimise ``Σ_i e^{s_i} L_i − s_i`` jointly in ``s``,
    which drives every scaled loss ``e^{s_i} L_i`` towards 1."""

    absent_tasks = "the present terms only; an absent task's scale gets no gradient"

    def __init__(self, num_tasks: int | None = None):
        super().__init__(num_tasks)
        self._init_learned()

    def scalarize(self, losses: Tensor) -> Scalarized:
        scaled = self.scale_losses(losses)
        return Scalarized(loss=scaled.sum(), weights=torch.exp(self.learned_like(losses).detach()))


@register(
    "imtl",
    kind="gradient",
    cost="T backward",
    stateful=True,
    paper="Liu et al., Towards Impartial Multi-task Learning, ICLR 2021 (IMTL: IMTL-L + IMTL-G)",
    conventions="the hybrid of the paper (and LibMTL): IMTL-G on the gradients of the IMTL-L scaled "
    "losses; heads and the log-scales receive the gradients of their scaled loss",
)
class IMTL(_LossScales, GramianStrategy):
    """IMTL, the hybrid (Liu et al., 2021, Algorithm 1): losses scaled by IMTL-L's learnable
    ``e^{s} L − s``, shared gradients combined by IMTL-G. ``aggregate(J)`` on a plain matrix takes
    the rows of ``J`` as gradients of the scaled losses and applies IMTL-G."""

    absent_tasks = "IMTL-G over the present rows; an absent task's scale gets no gradient"

    def __init__(self, num_tasks: int | None = None):
        super().__init__(num_tasks)
        self._init_learned()

    def transform_loss(self, index: int, loss: Tensor) -> Tensor:
        task = index if self._present is None else int(self._present[index])
        if not self._learned:
            self.learned_like(loss)
        s = self._learned[task].to(loss.dtype)
        return torch.exp(s) * loss - s  # one task's graph reaches its own scale only

    def weigh(self, gramian: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, Commit]:
        return imtl_g_weights(gramian), _noop

    def weigh_at_precision(
        self, gramian: np.ndarray, losses: np.ndarray | None, rounding: float
    ) -> tuple[np.ndarray, Commit]:
        return imtl_g_weights(gramian, rounding), _noop
