"""F-MTL: task-based flat regions (sharpness-aware per-task gradients, any aggregator)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..hooks.perturb import Grads, Probe
from ..registry import register
from ._sam import SharpnessAware
from .base import Combined, GradientStrategy


@register(
    "fmtl",
    kind="gradient",
    cost="2T backward + T forward",
    stateful=True,
    paper="Phan et al., Beyond Losses Reweighting: Empowering Multi-Task Learning via the "
    "Generalization Perspective (F-MTL), ICCV 2025",
    conventions="base='pcgrad' (any gradient strategy); rho=0.05 (SAM's default; the authors tune "
    "it per dataset); shared and head perturbations each scaled to norm rho (authors' code); "
    "heads get their SAM gradient; the base's state advances with the loss-gradient combination; "
    "BatchNorm running statistics restored exactly (the code zeroes the momentum)",
    hooks=("closure",),
)
class FMTL(SharpnessAware):
    """F-MTL (Phan et al., ICCV 2025; arXiv 2211.13723, Algorithm 1).

    For each task ``t``: ``g_t = ∇ℓ_t(θ)``, the worst-case perturbation ``ε_t = ρ g_t / ‖g_t‖``
    (shared parameters; the task's head gets its own ``ρ h_t / ‖h_t‖``), the SAM gradient
    ``g_t^SAM = ∇ℓ_t(θ + ε_t)`` and the flatness gradient ``f_t = g_t^SAM − g_t``. The shared
    update aggregates both families separately with the base strategy::

        d = Agg(g_1, ..., g_T) + Agg(f_1, ..., f_T)

    and each head takes its task's SAM gradient. ``step(closure)`` re-evaluates the closure once
    per task at ``θ + ε_t`` (the same batch; BatchNorm statistics frozen, parameters restored bit
    for bit). ``mtlopt.create("fmtl", base="upgrad")`` makes "SAM + any aggregator" one line.

    Args:
        base: the gradient strategy that aggregates (name or instance; default ``"pcgrad"``).
        rho: perturbation radius ``ρ`` (default 0.05).
        **base_kwargs: hyperparameters of the base, when given by name.
    """

    absent_tasks = "the base's rule, on the present tasks' loss and flatness gradients"

    def __init__(
        self, base: str | GradientStrategy = "pcgrad", rho: float = 0.05,
        num_tasks: int | None = None, **base_kwargs: Any,
    ):  # fmt: skip
        super().__init__(base, rho, num_tasks, base_kwargs)

    def hyperparameters(self) -> dict[str, object]:
        return {"base": self.base, "rho": self.rho}

    def directions(self, plain: list[Grads], shared: set[int], probe: Probe) -> list[list[Grads]]:
        return [
            [
                {pid: g for pid, g in grads.items() if pid in shared},
                {pid: g for pid, g in grads.items() if pid not in shared},
            ]
            for grads in plain
        ]

    def combine(self, jacobian: Tensor, losses: Tensor | None = None) -> Combined:
        plain = self.plain_jacobian().to(jacobian)
        loss_part = self.base.combine(plain, losses)
        flat_part = self.base.combine(jacobian - plain, losses)
        return Combined(loss_part.direction + flat_part.direction, None, loss_part.commit)
