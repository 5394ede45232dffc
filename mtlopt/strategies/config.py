"""ConFIG: conflict-free inverse gradients."""

from __future__ import annotations

import numpy as np

from ..registry import register
from .base import Commit, GramianStrategy, _noop


@register(
    "config",
    kind="gradient",
    cost="T backward",
    stateful=False,
    paper="Liu et al., ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks, "
    "ICLR 2025 (arXiv 2408.11104, 2024)",
    conventions="pseudo-inverse of the unit gradients, eigenvalues of their Gramian below "
    "max(1e-10, T√P·ε)·λ_max dropped (ε of J's dtype); length = Σ_i g_iᵀ ĝ_u (the paper's "
    "default)",
)
class ConFIG(GramianStrategy):
    """ConFIG (Liu et al., 2024, Eq. 2).

    ``g_u = U⁺ 1`` with ``U`` the unit task gradients (rows), so ``g_u`` has the same positive
    projection on every task; the update is ``(Σ_i g_iᵀ ĝ_u) ĝ_u`` with ``ĝ_u = g_u / ‖g_u‖``. In
    Gramian terms ``g_u = Σ_i (a_i / ‖g_i‖) g_i`` with ``a = (D⁻¹ G D⁻¹)⁺ 1``.
    """

    def weigh(self, gramian: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, Commit]:
        return self.weigh_at_precision(gramian, losses, 0.0)

    def weigh_at_precision(
        self, gramian: np.ndarray, losses: np.ndarray | None, rounding: float
    ) -> tuple[np.ndarray, Commit]:
        norms = np.sqrt(np.clip(np.diag(gramian), 0.0, None))
        alive = norms > 0
        coefficients = np.zeros(len(gramian))
        if not np.any(alive):
            return coefficients, _noop
        unit_gramian = gramian[np.ix_(alive, alive)] / np.outer(norms[alive], norms[alive])
        # Below the Gramian's rounding (T√P·ε of J's dtype) an eigenvalue or a projection is 0.
        tolerance = max(1e-10, rounding)
        inverse = np.linalg.pinv(unit_gramian, rcond=tolerance, hermitian=True)
        ones = np.ones(int(alive.sum()))
        a = inverse @ ones
        if np.linalg.norm(a) <= tolerance * np.linalg.norm(inverse) * np.sqrt(ones.size):
            return coefficients, _noop  # 1 is orthogonal to range(U): no equal-projection direction
        coefficients[alive] = a / norms[alive]
        norm2 = float(coefficients @ gramian @ coefficients)  # ‖g_u‖² = aᵀ (D⁻¹GD⁻¹) a
        if not norm2 > 0:
            return np.zeros(len(gramian)), _noop
        length = float(np.sum(gramian @ coefficients)) / np.sqrt(norm2)
        return coefficients * (length / np.sqrt(norm2)), _noop
