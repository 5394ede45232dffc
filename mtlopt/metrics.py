"""Multi-task performance relative to single-task baselines.

Two conventions exist and must not be mixed (see the benchmarks docs):

- **Δm** (Maninis et al., 2019; the Nash-MTL / FAMO / CAGrad protocol), in percent, **lower is
  better**: ``Δm = (1/M) Σ_m s_m (M_m − B_m) / B_m × 100`` over all M metrics, with ``s_m = +1``
  for lower-is-better metrics (errors) and ``−1`` for higher-is-better ones (accuracies).
- **Δp** (LibMTL), in percent, **higher is better**: the same relative changes with the opposite
  sign, averaged per task first and then over tasks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def delta_m(
    values: Mapping[str, float],
    baselines: Mapping[str, float],
    lower_is_better: Mapping[str, bool],
) -> float:
    """Δm in percent over all metrics (lower is better); keys must match."""
    keys = _check(values, baselines, lower_is_better)
    total = 0.0
    for key in keys:
        sign = 1.0 if lower_is_better[key] else -1.0
        total += sign * (values[key] - baselines[key]) / baselines[key]
    return 100.0 * total / len(keys)


def delta_p(
    values: Mapping[str, float],
    baselines: Mapping[str, float],
    higher_is_better: Mapping[str, bool],
    tasks: Mapping[str, Sequence[str]],
) -> float:
    """LibMTL's Δp in percent (higher is better): per-task means of the signed relative changes,
    then the mean over tasks. ``tasks`` maps each task to its metric names."""
    per_task = []
    for metrics in tasks.values():
        changes = [
            (1.0 if higher_is_better[m] else -1.0) * (values[m] - baselines[m]) / baselines[m]
            for m in metrics
        ]
        per_task.append(sum(changes) / len(changes))
    return 100.0 * sum(per_task) / len(per_task)


def _check(
    values: Mapping[str, float], baselines: Mapping[str, float], directions: Mapping[str, bool]
) -> list[str]:
    keys = list(values)
    if not keys:
        raise ValueError("no metrics given")
    if set(keys) != set(baselines) or set(keys) != set(directions):
        raise KeyError(
            f"metrics {sorted(values)}, baselines {sorted(baselines)} and directions "
            f"{sorted(directions)} must name the same metrics"
        )
    zero = [k for k in keys if baselines[k] == 0]
    if zero:
        raise ZeroDivisionError(f"baseline of {zero} is 0: relative change undefined")
    return keys
