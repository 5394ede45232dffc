"""IMTL: impartial multi-task learning (IMTL-G, IMTL-L and the hybrid IMTL)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..registry import register
from .base import Commit, GramianStrategy, LearnedTaskVector, LossStrategy, Scalarized, _noop


def imtl_g_weights(gramian: np.ndarray) -> np.ndarray:
    """IMTL-G closed form (Liu et al., 2021, Eq. 14) from the Gramian alone.

    With ``D = [g_1 − g_k]_k`` and ``U = [u_1 − u_k]_k`` (``u = g/‖g‖``), ``α_{2:T} = g_1 Uᵀ
    (D Uᵀ)^{-1}`` and ``α_1 = 1 − Σ α_{2:T}``; the combined gradient has equal projections on every
    unit task gradient. Every product is an entry of ``G`` divided by a norm.
    """
    t = gramian.shape[0]
    if t == 1:
        return np.ones(1)
    norms = np.sqrt(np.clip(np.diag(gramian), 0.0, None))
    safe = np.where(norms > 0, norms, 1.0)
    dot_u = gramian / safe[None, :]  # dot_u[i, j] = g_i · u_j
    rhs = dot_u[0, 0] - dot_u[0, 1:]  # (g_1 Uᵀ)_k
    du = dot_u[0, 0] - dot_u[0, 1:][None, :] - dot_u[1:, 0][:, None] + dot_u[1:, 1:]
    # Singular values are measured against the gradient scale, not against du's own largest one:
    # collinear gradients make du vanish up to rounding, and then α_{2:T} = 0 (plain g_1).
    u, sv, vt = np.linalg.svd(du.T)
    inverse = np.where(sv > 1e-10 * norms.max(), 1.0 / np.where(sv > 0, sv, 1.0), 0.0)
    alpha_rest = vt.T @ (inverse * (u.T @ rhs))
    return np.concatenate([[1.0 - alpha_rest.sum()], alpha_rest])


@register(
    "imtl_g",
    kind="gradient",
    cost="T backward",
    stateful=False,
    paper="Liu et al., Towards Impartial Multi-task Learning, ICLR 2021 (IMTL-G)",
    conventions="weights sum to 1 (closed form); least-squares solve when D Uᵀ is singular",
)
class IMTLG(GramianStrategy):
    """IMTL-G (Liu et al., 2021, Sec. 3.2): the update whose projections onto every unit task
    gradient are equal, ``Σ_i α_i g_i`` with ``Σ_i α_i = 1``."""

    def weigh(self, gramian: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, Commit]:
        return imtl_g_weights(gramian), _noop


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
