"""MoCo: stochastic multi-objective gradient correction."""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from ..registry import register
from ._state import TaskAxes
from .base import Combined, GradientStrategy, gramian_of


@register(
    "moco",
    kind="gradient",
    cost="T backward",
    stateful=True,
    paper="Fernando et al., Mitigating Gradient Bias in Multi-objective Learning: A Provably "
    "Convergent Approach, ICLR 2023",
    conventions="β_k = 0.5/√k, γ_k = 0.1/√k, ρ = 0 (LibMTL's defaults); raw task gradients and a "
    "Euclidean projection of λ onto the simplex (paper, Algorithm 1); LibMTL (from the authors' "
    "shared code) tracks g_i/‖g_i‖·L_i (normalize='loss') and maps λ with a softmax "
    "(projection='softmax'); y starts at 0, λ at 1/T",
)
class MoCo(GradientStrategy):
    """MoCo (Fernando et al., 2023, Algorithm 1).

    Tracks each task's gradient with ``y_i ← y_i − β_k (y_i − g_i)``, then takes one projected
    step on the MGDA objective ``½ λᵀ (Y Yᵀ + ρ I) λ``:
    ``λ ← Π_Δ(λ − γ_k (Y Yᵀ + ρ I) λ)``, with ``β_k = β / k^{σ_β}``, ``γ_k = γ / k^{σ_γ}``; the
    update is ``Yᵀ λ``. ``Y`` is a persistent T×P buffer (memory like DB-MTL's EMA); when the
    shared parameters change each parameter's columns follow it and a new one starts at zero.

    Reference code: LibMTL's ``weighting/MoCo.py`` (built from the authors' shared code; no
    public official repository).

    Where the defaults come from: the update (raw gradients, Euclidean projection) is the paper's
    Algorithm 1; the step sizes ``β_k = 0.5/√k``, ``γ_k = 0.1/√k`` and ``ρ = 0`` are LibMTL's. The
    first author's own public implementation (in the MoDo repository, heshandevaka/Trade-Off-MOL,
    ``LibMTL/config.py``) uses constant ``β = 0.1``, ``γ = 0.1``, ``ρ = 0.1`` with raw gradients
    and the projection: ``beta=0.1, beta_sigma=0, gamma=0.1, gamma_sigma=0, rho=0.1``. LibMTL's
    complete setting adds ``normalize="loss", projection="softmax"``. With these defaults MoCo
    did not learn on the multifashion benchmark (one seed, 300 steps: Δm 66.6 % against EW's
    9.5 %; see the benchmarks page); no default differs from these sources, and the cause has not
    been found.

    Args:
        beta: tracking rate β (default 0.5).
        beta_sigma: decay exponent of β_k (default 0.5).
        gamma: λ step size γ (default 0.1).
        gamma_sigma: decay exponent of γ_k (default 0.5).
        rho: ℓ2 regularisation ρ of the λ step (default 0).
        normalize: ``"none"`` (paper: raw gradients) or ``"loss"`` (LibMTL: ``g_i/‖g_i‖ · L_i``).
        projection: ``"simplex"`` (paper: Euclidean projection) or ``"softmax"`` (LibMTL).
    """

    absent_tasks = (
        "present rows; an absent task's y row and λ entry are not advanced; λ of the present "
        "tasks is renormalised to the simplex for the step"
    )

    supports_representation = False  # Y needs a fixed P; feature shapes vary with the batch
    _state_attrs = ("y", "lambd", "_step")
    _task_state: ClassVar[dict[str, TaskAxes]] = {
        "y": TaskAxes((0,), 0.0),
        "lambd": TaskAxes((0,), 1.0),
    }

    def __init__(
        self,
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
        normalize: Literal["none", "loss"] = "none",
        projection: Literal["simplex", "softmax"] = "simplex",
        num_tasks: int | None = None,
    ):
        super().__init__(num_tasks)
        if normalize not in ("none", "loss") or projection not in ("simplex", "softmax"):
            raise ValueError(
                f"normalize must be 'none' or 'loss' and projection 'simplex' or 'softmax', got "
                f"{normalize!r}, {projection!r}"
            )
        if not (0 < beta <= 1 and gamma > 0 and rho >= 0):
            raise ValueError("need 0 < beta ≤ 1, gamma > 0 and rho ≥ 0")
        self.beta, self.beta_sigma, self.gamma, self.gamma_sigma = beta, beta_sigma, gamma, gamma_sigma
        self.rho, self.normalize, self.projection = rho, normalize, projection
        self.y: Tensor | None = None
        self.lambd: np.ndarray | None = None
        self._step = 0

    def hyperparameters(self) -> dict[str, object]:
        return {
            "beta": self.beta,
            "gamma": self.gamma,
            "rho": self.rho,
            "normalize": self.normalize,
            "projection": self.projection,
        }

    def remap_columns(self, mapping: Tensor) -> None:
        if self.y is None:
            return
        keep = mapping >= 0
        y = self.y.new_zeros(self.y.shape[0], mapping.numel())
        y[:, keep.to(y.device)] = self.y[:, mapping[keep].to(y.device)]
        self.y = y

    def combine(self, jacobian: Tensor, losses: Tensor | None = None) -> Combined:
        t = jacobian.shape[0]
        step = self._step + 1
        target = jacobian
        if self.normalize == "loss":
            if losses is None:
                raise ValueError("moco with normalize='loss' needs the task losses")
            norms = jacobian.norm(dim=1, keepdim=True)
            target = jacobian / (norms + 1e-8) * losses.to(jacobian)[:, None]
        if self.y is not None and self.y.shape != jacobian.shape:
            raise ValueError(f"moco's y has shape {tuple(self.y.shape)}, J has {tuple(jacobian.shape)}")
        # y ← y − β_k (y − target), y₀ = 0: one fused pass over T×P (torch.lerp)
        rate = self.beta / step**self.beta_sigma
        y = target * rate if self.y is None else torch.lerp(self.y.to(jacobian), target, rate)
        lambd = np.full(t, 1.0 / t) if self.lambd is None else self.lambd.astype(np.float64)
        lambd = lambd / lambd.sum() if lambd.sum() > 0 else np.full(t, 1.0 / t)
        gram = gramian_of(y)  # float64 where y's dtype overflows
        stepped = lambd - (self.gamma / step**self.gamma_sigma) * (gram + self.rho * np.eye(t)) @ lambd
        new = project_simplex(stepped) if self.projection == "simplex" else _softmax(stepped)
        weights = torch.from_numpy(new).to(jacobian)
        direction = weights @ y

        def commit() -> None:
            self.y, self.lambd, self._step = y, new, step

        return Combined(direction=direction, weights=None, commit=commit)


def project_simplex(v: np.ndarray) -> np.ndarray:
    """The Euclidean projection of ``v`` onto the probability simplex (sort-based, exact)."""
    if not np.all(np.isfinite(v)):
        # An overflowed step: the projection of a vector with +inf entries is uniform over them.
        big = np.isposinf(v) if np.isposinf(v).any() else (v == np.nanmax(v))
        return big / big.sum()
    v = v - v.max()  # the projection is invariant to shifts along (1, …, 1); the top entry is 0
    u = np.sort(v)[::-1]
    cumulative = np.cumsum(u) - 1.0
    index = np.arange(1, len(v) + 1)
    rho = np.nonzero(u - cumulative / index > 0)[0][-1]
    return np.maximum(v - cumulative[rho] / (rho + 1), 0.0)


def _softmax(v: np.ndarray) -> np.ndarray:
    shifted = v - np.max(v)
    e = np.exp(shifted)
    return e / e.sum()
