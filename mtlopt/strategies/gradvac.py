"""GradVac: gradient vaccine."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from ..registry import register
from ._state import TaskAxes
from .base import Commit, GramianStrategy, Randomized, chain
from .pcgrad import advance_together


@register(
    "gradvac",
    kind="gradient",
    cost="T backward",
    stateful=True,
    paper="Wang et al., Gradient Vaccine: Investigating and Improving Multi-task Optimization in "
    "Massively Multilingual Models, ICLR 2021",
    conventions="beta=0.5 (LibMTL's and torchjd's default; the paper tunes it); targets start at 0 "
    "and are updated on every visit (LibMTL after its 2024 fix); whole-model granularity; "
    "sum of the adjusted gradients",
)
class GradVac(Randomized, GramianStrategy):
    """GradVac (Wang et al., 2021, Algorithm 1, Eqs. 2 and 5).

    For each task i and, in random order, every other task j: with ``φ = cos(g_i', g_j)`` and the
    pair's EMA target ``φ̂_ij``, if ``φ < φ̂_ij`` add ``w g_j`` to ``g_i'`` with
    ``w = ‖g_i'‖ (φ̂ √(1−φ²) − φ √(1−φ̂²)) / (‖g_j‖ √(1−φ̂²))``, which raises the cosine to exactly
    ``φ̂``; then ``φ̂_ij ← (1−β) φ̂_ij + β φ``. The update is ``Σ_i g_i'``. With targets at 0 the
    first step is PCGrad. Runs on the coefficients ``g_i' = c_iᵀ J`` with the Gramian only.

    The paper keeps targets per layer; ``mtlopt.create("gradvac", granularity=...)`` picks the
    granularity, as LibMTL's ``GradVac_group_type``: ``"whole_model"`` (default, one target per
    task pair), ``"all_layer"`` (one GradVac per module that owns parameters, ``modules=model``
    required) or ``"all_matrix"`` (one per parameter tensor); the last two are
    ``group_by="module"`` and ``group_by="tensor"`` (:class:`~mtlopt.strategies.grouped.Grouped`),
    each group with its own targets.

    Args:
        beta: EMA rate of the targets (default 0.5).
        seed: seed of the strategy's generator.
    """

    GRANULARITY: ClassVar[dict[str, str | None]] = {
        "whole_model": None,
        "all_layer": "module",
        "all_matrix": "tensor",
    }

    @staticmethod
    def grouping(options: dict[str, object]) -> str | None:
        granularity = options.pop("granularity", "whole_model")
        if granularity not in GradVac.GRANULARITY:
            raise ValueError(
                f"granularity must be one of {', '.join(map(repr, GradVac.GRANULARITY))}, got "
                f"{granularity!r}"
            )
        return GradVac.GRANULARITY[granularity]  # type: ignore[index]

    absent_tasks = (
        "present rows, visited in random order among the present tasks; targets between "
        "absent tasks are not updated"
    )

    _state_attrs = ("targets", "_rng_state")
    _task_state: ClassVar[dict[str, TaskAxes]] = {"targets": TaskAxes((0, 1), 0.0)}

    def __init__(self, beta: float = 0.5, seed: int | None = None, num_tasks: int | None = None):
        super().__init__(num_tasks)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must lie in [0, 1], got {beta}")
        self.beta = beta
        self.targets: np.ndarray | None = None
        self._init_rng(seed)

    def hyperparameters(self) -> dict[str, object]:
        return {"beta": self.beta}

    def weigh(self, gramian: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, Commit]:
        rng, commit_rng = self._step_rng()
        t = gramian.shape[0]
        targets = np.zeros((t, t)) if self.targets is None else self.targets
        orders = [rng.permutation(np.delete(np.arange(t), i)) for i in range(t)]
        coefficients, new_targets = vaccinate(gramian, targets, orders, self.beta)

        def commit_targets() -> None:
            self.targets = new_targets

        return coefficients.sum(axis=0), chain(commit_rng, commit_targets)


def vaccinate(
    gramian: np.ndarray,
    targets: np.ndarray,
    orders: list[np.ndarray],
    beta: float,
    block: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """GradVac's adjusted gradients as coefficients (row i: ``g_i' = c_iᵀ J``) and the new targets.

    ``orders[i]`` is the order in which task i visits the other tasks. As in PCGrad the T
    sequences are independent and advance together (:func:`~mtlopt.strategies.pcgrad.
    advance_together`), round k pairing task i with ``orders[i][k]``; the squared norms
    ``‖g_i'‖² = c_iᵀ G c_i`` are updated in place of being recomputed.
    """
    t = gramian.shape[0]
    targets = targets.copy()
    norms = np.sqrt(np.clip(np.diag(gramian), 0.0, None))
    squared = np.diag(gramian).copy()  # diag(C G Cᵀ)
    tasks = np.arange(t)

    def adjust(partners: np.ndarray, present: np.ndarray, dots: np.ndarray) -> np.ndarray:
        nonlocal squared
        norm_i = np.sqrt(np.clip(squared, 0.0, None))
        norm_j = norms[partners]
        active = present & (norm_i > 0.0) & (norm_j > 0.0)
        denominator = np.where(active, norm_i * norm_j, 1.0)
        phi = np.where(active, np.clip(dots / denominator, -1.0, 1.0), 0.0)
        target = targets[tasks, partners]
        below_target = active & (phi < target)
        w = norm_i * (target * np.sqrt(1 - phi**2) - phi * np.sqrt(1 - target**2))
        scale = np.where(active, norm_j * np.sqrt(np.maximum(1 - target**2, 1e-12)), 1.0)
        steps = np.where(below_target, w / scale, 0.0)
        # ‖c + s e_j‖²_G = ‖c‖²_G + 2 s (C G)_ij + s² G_jj.
        squared = squared + 2 * steps * dots + steps**2 * gramian[partners, partners]
        targets[tasks, partners] = np.where(active, (1 - beta) * target + beta * phi, target)
        return steps

    coefficients = advance_together(gramian, orders, adjust, block)
    return coefficients, targets
