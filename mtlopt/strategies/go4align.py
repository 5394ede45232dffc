"""GO4Align: group risk minimisation with risk-guided group indicators."""

from __future__ import annotations

import itertools
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from ..registry import register
from ._state import TaskAxes
from .base import LossStrategy, Scalarized


@register(
    "go4align",
    kind="loss",
    cost="1 backward",
    stateful=True,
    paper="Shen et al., GO4Align: Group Optimization for Multi-Task Alignment, arXiv 2404.06486 "
    "(2024)",
    conventions="robust_step_size η = 1e-4 (the authors' code); num_groups=2 (the authors' code "
    "takes it as an argument without a default; a single group gives every task the mean "
    "indicator); exact 1-D k-means (optimal partition of the sorted indicators, deterministic) "
    "where the authors run Lloyd's k-means from a random start; weights unbounded (Σ L / L_i, as "
    "the paper and code: neither normalises nor clips); max_weight= clips them (opt-in)",
)
class GO4Align(LossStrategy):
    """GO4Align (Shen et al., 2024): adaptive group risk minimisation.

    Risk-guided indicators: the task probabilities follow an exponentiated-gradient step on the
    losses, ``p ← p ⊙ exp(−η L)``, renormalised (``p`` starts at 1/T), and with the scales
    ``s_i = Σ_j L_j / L_i`` each task's indicator is ``r_i = s_i p_i``. Dynamical group
    assignment: k-means on the T scalars ``r_i`` into ``num_groups`` groups; each task takes its
    group's centre ``c(i)`` as weight and the objective is ``Σ_i c(i) L_i``.

    The k-means is solved exactly: in one dimension the optimal clusters are contiguous runs of
    the sorted values, found by dynamic programming over the T scalars (in torch, O(G T²)).

    **The weights are unbounded.** ``s_i = Σ_j L_j / L_i`` grows without limit as a loss nears 0:
    a task whose loss is 1e-9 of the others' gets a weight near 1e9 (divided by about T through
    ``p_i``), and its group shares it. Neither the paper nor the authors' code normalises or clips
    the weights, and mtlopt keeps that default; ``max_weight=`` clips every weight at a bound
    (opt-in, not in the paper). Losses that can reach 0 (a task the model fits exactly, a
    regulariser) make the step size effectively explode: pass ``max_weight`` there.

    Reference code: autumn9999/GO4Align, ``methods/cluster_methods.py`` (``GO4ALIGN``).

    Args:
        num_groups: number of groups G (default 2; capped at the number of tasks).
        robust_step_size: η (default 1e-4).
        max_weight: clip each weight at this value (default ``None``: unbounded, as the paper).
    """

    absent_tasks = (
        "indicators and groups over the present tasks; an absent task's probability is not "
        "advanced"
    )

    linear_in_losses = False
    _state_attrs = ("probs",)
    _task_state: ClassVar[dict[str, TaskAxes]] = {"probs": TaskAxes((0,), np.nan)}

    def __init__(
        self, num_groups: int = 2, robust_step_size: float = 1e-4,
        max_weight: float | None = None, num_tasks: int | None = None,
    ):  # fmt: skip
        super().__init__(num_tasks)
        if num_groups < 1 or not robust_step_size >= 0:
            raise ValueError("num_groups must be at least 1 and robust_step_size non-negative")
        if max_weight is not None and not max_weight > 0:
            raise ValueError(f"max_weight must be positive (or None: unbounded), got {max_weight}")
        self.num_groups, self.robust_step_size = num_groups, robust_step_size
        self.max_weight = None if max_weight is None else float(max_weight)
        self.probs: np.ndarray | None = None

    def hyperparameters(self) -> dict[str, object]:
        return {
            "num_groups": self.num_groups, "robust_step_size": self.robust_step_size,
            "max_weight": self.max_weight,
        }  # fmt: skip

    def scalarize(self, losses: Tensor) -> Scalarized:
        t = losses.shape[0]
        observed = losses.detach().double().cpu()
        if bool((observed < 0).any()):
            raise ValueError(
                f"go4align's scales Σ_j L_j / L_i need non-negative losses, got {observed.tolist()}"
            )
        probs = torch.full((t,), 1.0 / t, dtype=torch.float64)
        if self.probs is not None:
            known = torch.from_numpy(np.nan_to_num(self.probs, nan=1.0 / t))
            probs = known / known.sum() if bool(known.sum() > 0) else probs
        log_p = torch.log(probs) - self.robust_step_size * observed
        probs = torch.softmax(log_p, dim=0)
        tiny = torch.finfo(torch.float64).tiny
        scales = observed.sum() / observed.clamp_min(tiny)
        indicators = scales * probs
        centres = kmeans_1d(indicators, min(self.num_groups, t))
        if self.max_weight is not None:
            centres = centres.clamp_max(self.max_weight)
        weights = centres.to(losses)
        new = probs.numpy()

        def commit() -> None:
            self.probs = new

        return Scalarized(loss=weights @ losses, weights=weights.detach(), commit=commit)


def kmeans_1d(values: Tensor, groups: int) -> Tensor:
    """Each value's cluster centre in the optimal k-means partition of ``values`` (1-D) into
    ``groups`` clusters: contiguous runs of the sorted values, by dynamic programming."""
    n = values.numel()
    order = torch.argsort(values)
    x = values[order]
    prefix = torch.cat([x.new_zeros(1), torch.cumsum(x, 0)])
    prefix_sq = torch.cat([x.new_zeros(1), torch.cumsum(x * x, 0)])
    start = torch.arange(n + 1)[:, None]
    stop = torch.arange(n + 1)[None, :]
    count = (stop - start).clamp_min(1).to(x.dtype)
    total = prefix[stop] - prefix[start]
    # cost[a, b]: squared error of the run x[a:b] around its mean (b > a), inf otherwise.
    cost = (prefix_sq[stop] - prefix_sq[start]) - total * total / count
    cost = torch.where(stop > start, cost.clamp_min(0.0), torch.full_like(cost, float("inf")))
    best = cost[0].clone()  # best[b]: one cluster over x[:b]
    cuts = []
    for _ in range(1, groups):
        candidates = best[:, None] + cost  # last cluster x[a:b] after the best split of x[:a]
        best, cut = candidates.min(dim=0)
        cuts.append(cut)
    bounds, end = [n], n
    for cut in reversed(cuts):
        end = int(cut[end])
        bounds.append(end)
    bounds.append(0)
    bounds = sorted(set(bounds))
    centres = torch.empty_like(x)
    for a, b in itertools.pairwise(bounds):
        centres[a:b] = x[a:b].mean()
    result = torch.empty_like(values)
    result[order] = centres
    return result
