"""SAMO: sharpness-aware multi-task optimization with joint global-local perturbations."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..hooks.perturb import Grads, Probe
from ..registry import register
from ._sam import SharpnessAware
from .base import Combined, GradientStrategy, Randomized, chain


@register(
    "samo",
    kind="gradient",
    cost="2T backward + T forward",
    stateful=True,
    paper="SAMO: A Lightweight Sharpness-Aware Approach for Multi-Task Optimization "
    "with Joint Global-Local Perturbation, ICCV 2025",
    conventions="base='fairgrad' (the authors' script; any gradient strategy); rho=1e-3, "
    "beta=0.5 (authors' script); zeroth-order eps=1e-3 with one Gaussian direction shared by the "
    "tasks (2 forwards; the code draws per task); global gradient from the T per-task gradients "
    "(the code: one backward of the mean loss); one global norm per perturbation (the code; the "
    "paper normalises layer-wise); seedable",
    hooks=("closure",),
)
class SAMO(Randomized, SharpnessAware):
    """SAMO (ICCV 2025; official code OptMN-Lab/SAMO).

    A global gradient ``g = ∇ (1/T) Σ_t ℓ_t`` and, per task, a zeroth-order local estimate
    ``ĝ_t = (ℓ_t(θ + εz) − ℓ_t(θ − εz)) / (2ε) · z`` with ``z ~ N(0, I)`` on the shared parameters
    are mixed into the perturbation direction ``e_t = (1 − β) g + β ĝ_t``; with
    ``ε_t = ρ e_t / ‖e_t‖`` (the task's head moved by ``ρ h_t / ‖h_t‖``) the SAM gradients
    ``g_t^SAM = ∇ℓ_t(θ + ε_t)`` are aggregated by the base strategy, ``d = Agg(g_1^SAM, ...)``;
    heads take their SAM gradient. Closure as :class:`~mtlopt.strategies.fmtl.FMTL` (plus two
    forwards for the zeroth-order estimate).

    Args:
        base: the gradient strategy that aggregates (name or instance; default ``"fairgrad"``).
        rho: perturbation radius ``ρ`` (default 1e-3).
        beta: weight ``β`` of the local estimate (default 0.5).
        eps: finite-difference step ``ε`` of the estimate (default 1e-3).
        seed: seed of the strategy's generator for ``z`` (saved in ``state_dict``).
        **base_kwargs: hyperparameters of the base, when given by name.
    """

    absent_tasks = "the base's rule, on the present tasks' SAM gradients (g averages them)"

    _state_attrs = ("_rng_state",)

    def __init__(
        self, base: str | GradientStrategy = "fairgrad", rho: float = 1e-3, beta: float = 0.5,
        eps: float = 1e-3, seed: int | None = None, num_tasks: int | None = None,
        **base_kwargs: Any,
    ):  # fmt: skip
        super().__init__(base, rho, num_tasks, base_kwargs)
        if not 0 <= beta <= 1 or not eps > 0:
            raise ValueError("need 0 <= beta <= 1 and eps > 0")
        self.beta, self.eps = beta, eps
        self._init_rng(seed)

    def hyperparameters(self) -> dict[str, object]:
        return {"base": self.base, "rho": self.rho, "beta": self.beta, "eps": self.eps}

    def directions(self, plain: list[Grads], shared: set[int], probe: Probe) -> list[list[Grads]]:
        count = len(plain)
        params = probe.params  # in the optimizer's parameter order: z is drawn in that order
        touched = {pid for grads in plain for pid in grads if pid in shared}
        reached = [pid for pid in params if pid in touched]
        mean = {
            pid: sum((g[pid] for g in plain if pid in g), torch.zeros_like(params[pid])) / count
            for pid in reached
        }
        rng, commit = self._step_rng()
        probe.commit = commit
        z = {
            pid: torch.from_numpy(rng.standard_normal(params[pid].numel()))
            .reshape(params[pid].shape)
            .to(params[pid])
            for pid in reached
        }
        ahead = probe.losses_at({pid: self.eps * v for pid, v in z.items()})
        behind = probe.losses_at({pid: -self.eps * v for pid, v in z.items()})
        slopes = ((ahead - behind) / (2 * self.eps)).tolist()
        return [
            [
                {
                    pid: (1 - self.beta) * mean[pid] + self.beta * slopes[k] * z[pid]
                    for pid in reached
                    if pid in grads
                },
                {pid: g for pid, g in grads.items() if pid not in shared},
            ]
            for k, grads in enumerate(plain)
        ]

    def combine(self, jacobian: Tensor, losses: Tensor | None = None) -> Combined:
        combined = self.base.combine(jacobian, losses)
        combined.commit = chain(combined.commit, self.feed_commit())
        return combined


