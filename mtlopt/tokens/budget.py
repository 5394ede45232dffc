"""Where DTME expands, and what the expansion is predicted to cost.

DTME-MTL (Jeong & Yoon, ICCV 2025, Alg. 1, Tables 2 and 13) modifies the ``round(ρ·D)`` layers
with the highest range-space conflict rate (token modulation) and the ``round(ρ·D)`` layers with the
highest null-space conflict rate (task tokens). Every block from the first modified one, the branch
b, then runs K streams, so the per-step block compute grows from D to

    c(b) = (b + K·(D − b)) / D                                   (cost model of this module)

plus the task tokens' share: an expanded block d processes ``N + n`` tokens per stream instead of
``N``, about ``K·n/N`` block-equivalents more (linear in tokens; attention's quadratic part is
ignored). A budget bounds that multiplier: the layers allowed are those at or after the earliest
branch within the budget (and among the caller's candidates), ranked by conflict inside that set;
task tokens that would push the prediction over the budget are dropped, least conflicting first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .expansion import ExpansionPlan

DEFAULT_PLAN_WARNING = 3.0
"""A plan chosen without a budget and predicted above this multiplier is warned about."""


def predicted_multiplier(
    depth: int,
    num_tasks: int,
    modulation_layers: Sequence[int],
    expansion_layers: Sequence[int],
    tokens_per_task: int,
    sequence_length: int,
    gated: bool = False,
) -> float:
    """Predicted block compute of the expanded model over the original one (forward and backward
    alike): ``c(b)`` plus ``K·n/N / D`` per layer with task tokens, plus ``K / D`` per such layer
    when the tokens are gated (the gate runs the block once more without them)."""
    chosen = set(modulation_layers) | set(expansion_layers)
    if not chosen:
        return 1.0
    branch = min(chosen)
    cost = (branch + num_tasks * (depth - branch)) / depth
    if tokens_per_task and sequence_length:
        share = num_tasks * tokens_per_task / sequence_length / depth
        cost += share * len(set(expansion_layers))
    if gated and tokens_per_task:
        cost += num_tasks / depth * len(set(expansion_layers))
    return float(cost)


def choose_layers(
    range_rates: Sequence[float],
    null_rates: Sequence[float],
    num_tasks: int,
    rho: float,
    tokens_per_task: int,
    sequence_length: int,
    *,
    modulation: bool = True,
    expansion: bool = True,
    budget: float | None = None,
    layers: Sequence[int] | None = None,
    gated: bool = False,
) -> ExpansionPlan:
    """The expansion plan, ranked by conflict rate (ties to the earlier layer) inside the layers
    the budget and the candidate ``layers`` allow; raises if no layer fits the budget."""
    depth = len(range_rates)
    candidates = sorted(set(range(depth) if layers is None else layers))
    if any(not 0 <= d < depth for d in candidates):
        raise ValueError(f"layers must lie in [0, {depth}), got {list(layers or [])}")
    if budget is not None:
        if budget < 1.0:
            raise ValueError(f"budget is a compute multiplier (≥ 1), got {budget}")
        fits = [
            d
            for d in candidates
            if predicted_multiplier(depth, num_tasks, [d], [], 0, sequence_length) <= budget
        ]
        if not fits:
            smallest = predicted_multiplier(depth, num_tasks, [depth - 1], [], 0, sequence_length)
            raise ValueError(
                f"no layer fits budget={budget}: branching at the last block already costs "
                f"{smallest:.2f}× with {num_tasks} tasks over {depth} blocks; raise the budget"
            )
        candidates = [d for d in candidates if d >= min(fits)]
    count = min(max(1, round(rho * depth)), len(candidates))
    tm = _top(range_rates, candidates, count) if modulation else []
    te = _top(null_rates, candidates, count) if expansion and tokens_per_task > 0 else []

    def cost(te_layers: list[int]) -> float:
        return predicted_multiplier(
            depth, num_tasks, tm, te_layers, tokens_per_task, sequence_length, gated
        )

    if budget is not None:
        by_rate = sorted(te, key=lambda d: (null_rates[d], -d))
        while te and cost(te) > budget:
            te.remove(by_rate.pop(0))
    return ExpansionPlan(num_tasks, tm, te, tokens_per_task, cost(te), gated)


def _top(rates: Sequence[float], candidates: Sequence[int], count: int) -> list[int]:
    values = np.array([rates[d] for d in candidates])
    order = np.argsort(-values, kind="stable")[:count]
    return sorted(int(candidates[i]) for i in order)
