"""Paired comparison of each method with EW: same seed, same variant, same batches.

For each seed, the method's relative change against EW over all metrics (Δm with EW as the
reference, signed so that lower is better); over the seeds, the mean difference and its 95 %
Student-t interval. An interval that contains 0 reads "not distinguishable from EW"."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from scipy import stats

from mtlopt.metrics import delta_m

from .problem import Problem

NOT_DISTINGUISHABLE = "≈ EW (not distinguishable)"


@dataclass(frozen=True)
class Versus:
    mean: float
    """Mean over seeds of the method's Δm against EW, in % (negative: better than EW)."""
    low: float
    high: float
    seeds: int

    @property
    def verdict(self) -> str:
        if self.seeds < 2:
            return "1 seed: no interval"
        if self.low <= 0 <= self.high:
            return NOT_DISTINGUISHABLE
        return "better than EW" if self.high < 0 else "worse than EW"

    def cell(self) -> str:
        if self.seeds < 2:
            return f"{self.mean:+.3g} ({self.verdict})"
        return f"{self.mean:+.3g} [{self.low:+.3g}, {self.high:+.3g}] {self.verdict}"


def differences(problem: Problem, runs: list[dict], method: str, variant: str) -> list[float]:
    """Per seed: Δm of ``method`` against EW on the same seed and variant (seeds where either
    failed, or where an EW metric is 0, are left out)."""
    ok = [r for r in runs if "error" not in r and str(r["variant"]) == variant]
    ew = {r["seed"]: r["metrics"] for r in ok if r["method"] == "ew"}
    out = []
    for run in ok:
        if run["method"] != method or run["seed"] not in ew:
            continue
        reference = ew[run["seed"]]
        if any(reference.get(m) in (0, None) for m in problem.metrics):
            continue
        mine = {m: run["metrics"][m] for m in problem.metrics}
        out.append(delta_m(mine, {m: reference[m] for m in problem.metrics}, problem.metrics))
    return out


def versus_ew(diffs: list[float]) -> Versus | None:
    if not diffs:
        return None
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return Versus(mean, math.nan, math.nan, 1)
    half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return Versus(mean, mean - half, mean + half, len(diffs))
