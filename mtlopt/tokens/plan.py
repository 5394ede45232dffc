"""DTME's plan from an offline analysis at iteration 0, its stability, and explicit plans.

The paper's protocol (DTME-MTL, Jeong & Yoon, ICCV 2025, Alg. 1 and App. B.3): before training,
with the pretrained trunk and fresh heads, run the two-pass analysis in eval mode over a fixed set
of batches (the full training set on NYUD/PASCAL, 100 random mini-batches on Taskonomy), rank the
layers by range- and null-space conflict rate (Table 13: per space), and build the model with the
modules present from step 0. :func:`plan_expansion` does that and returns a :class:`TokenPlan`;
``create("dtme", plan=plan, model=model)`` applies it at construction.

A plan is only as good as the rate differences it ranks. :class:`PlanStability` resamples the
batches (bootstrap, and optionally disjoint subsets) and reports how often each layer is chosen and
how far the chosen layers' rates lie above the rest, with intervals: where the margin's interval
contains 0, the placement is within batch noise.

Explicit plans (layers chosen by the caller) and the controls of the paper's Tables 1, 2 and 13
(random placement with the same counts and branch point, reverse placement, swapped TM/TE, TM or
TE only) are methods of :class:`TokenPlan`.
"""

from __future__ import annotations

import copy
import random as _random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .analysis import TokenSpaceAnalysis
from .budget import choose_layers, predicted_multiplier
from .expansion import ExpansionPlan
from .report import ConflictReport
from .space import ConflictCounts, SplitRule
from .taps import find_blocks


@dataclass
class PlanStability:
    """How stable a conflict-driven plan is under resampling of the analysis batches.

    ``modulation_frequency[d]`` / ``expansion_frequency[d]``: the share of resamples whose plan gives
    layer d token modulation / task tokens. ``range_interval[d]`` / ``null_interval[d]``: 95 %
    percentile intervals of the layer's rates. ``modulation_margin`` / ``expansion_margin``: the
    lowest chosen layer's rate minus the highest unchosen candidate's (full data), with the 95 %
    interval of that difference for the same layers over the resamples; an interval that contains
    0 says the ranking is within batch noise. ``agreement``: the share of resamples that choose
    exactly the full-data plan. ``disjoint_plans``: ``(TM layers, TE layers)`` chosen on each of
    ``disjoint`` disjoint subsets of the batches. The token spaces are fitted once on all batches;
    the resampling is over the conflict counts.
    """

    resamples: int
    batches: int
    modulation_frequency: list[float]
    expansion_frequency: list[float]
    range_interval: list[tuple[float, float]]
    null_interval: list[tuple[float, float]]
    modulation_margin: tuple[float, float, float]
    expansion_margin: tuple[float, float, float]
    agreement: float
    disjoint_plans: list[tuple[list[int], list[int]]] = field(default_factory=list)

    @property
    def decisive(self) -> bool:
        """Both margins' intervals lie above 0 (a module kind that chose nothing counts as
        decisive)."""
        return all(
            np.isnan(m[0]) or m[1] > 0 for m in (self.modulation_margin, self.expansion_margin)
        )

    def to_markdown(self) -> str:
        lines = [
            f"plan stability over {self.resamples} bootstrap resamples of {self.batches} batches "
            f"(same plan in {100 * self.agreement:.0f} %):",
            "",
            "| layer | range rate 95 % | null rate 95 % | chosen for TM | chosen for TE |",
            "|---|---|---|---|---|",
        ]
        for d in range(len(self.modulation_frequency)):
            (rl, rh), (nl, nh) = self.range_interval[d], self.null_interval[d]
            lines.append(
                f"| {d} | {rl:.3f}–{rh:.3f} | {nl:.3f}–{nh:.3f} | "
                f"{100 * self.modulation_frequency[d]:.0f} % | "
                f"{100 * self.expansion_frequency[d]:.0f} % |"
            )
        lines.append("")
        for name, (mean, low, high) in (
            ("TM", self.modulation_margin),
            ("TE", self.expansion_margin),
        ):
            if np.isnan(mean):
                continue
            verdict = "decisive" if low > 0 else "within batch noise"
            lines.append(
                f"{name} margin (lowest chosen − highest unchosen rate): {mean:+.4f} "
                f"[{low:+.4f}, {high:+.4f}]: {verdict}"
            )
        if self.disjoint_plans:
            shown = "; ".join(f"TM {tm} TE {te}" for tm, te in self.disjoint_plans)
            lines.append(f"plans on {len(self.disjoint_plans)} disjoint subsets: {shown}")
        return "\n".join(lines)


@dataclass
class TokenPlan:
    """Where DTME puts its modules, why, and at what predicted cost.

    ``expansion`` holds the layers (``modulation_layers``, ``expansion_layers``), the task count,
    the tokens per task, whether the tokens are gated, and the predicted block-compute multiplier;
    ``dims`` the block widths (``None``: read from the blocks); ``report`` the conflict rates the
    plan was ranked from (``None`` for an explicit plan); ``stability`` the resampling report;
    ``selection`` how the layers were chosen (``"conflict"``, ``"explicit"``, ``"random"``,
    ``"reverse"``, ``"swapped"``, ``"modulation only"``, ``"tokens only"``).
    """

    expansion: ExpansionPlan
    depth: int
    dims: list[int] | None = None
    sequence_length: int = 0
    report: ConflictReport | None = None
    stability: PlanStability | None = None
    selection: str = "conflict"

    @property
    def num_tasks(self) -> int:
        return self.expansion.num_tasks

    @property
    def modulation_layers(self) -> list[int]:
        return list(self.expansion.modulation_layers)

    @property
    def expansion_layers(self) -> list[int]:
        return list(self.expansion.expansion_layers)

    @property
    def branch_layer(self) -> int | None:
        return self.expansion.branch_layer

    @property
    def predicted_multiplier(self) -> float:
        return self.expansion.predicted_multiplier

    @classmethod
    def explicit(
        cls,
        num_tasks: int,
        depth: int,
        modulation_layers: Sequence[int] = (),
        expansion_layers: Sequence[int] = (),
        *,
        tokens_per_task: int = 6,
        sequence_length: int = 0,
        gated: bool = True,
        dims: Sequence[int] | None = None,
        selection: str = "explicit",
    ) -> TokenPlan:
        """A plan whose layers the caller chooses (no analysis)."""
        for name, chosen in (("modulation", modulation_layers), ("expansion", expansion_layers)):
            if any(not 0 <= d < depth for d in chosen):
                raise ValueError(f"{name}_layers must lie in [0, {depth}), got {list(chosen)}")
        if dims is not None and len(dims) != depth:
            raise ValueError(f"{len(dims)} widths for {depth} blocks")
        tm, te = sorted(set(modulation_layers)), sorted(set(expansion_layers))
        cost = predicted_multiplier(
            depth, num_tasks, tm, te, tokens_per_task, sequence_length, gated
        )
        plan = ExpansionPlan(num_tasks, tm, te, tokens_per_task, cost, gated)
        return cls(plan, depth, None if dims is None else list(dims), sequence_length, None, None,
                   selection)

    def _with(self, tm: Sequence[int], te: Sequence[int], selection: str) -> TokenPlan:
        out = TokenPlan.explicit(
            self.num_tasks,
            self.depth,
            tm,
            te,
            tokens_per_task=self.expansion.tokens_per_task,
            sequence_length=self.sequence_length,
            gated=self.expansion.gated,
            dims=self.dims,
            selection=selection,
        )
        out.report = copy.deepcopy(self.report)
        return out

    def with_layers(
        self, modulation_layers: Sequence[int], expansion_layers: Sequence[int]
    ) -> TokenPlan:
        """This plan's settings (tasks, tokens, gate, widths, report) with other layers."""
        return self._with(modulation_layers, expansion_layers, "explicit")

    def random(self, seed: int) -> TokenPlan:
        """Random placement with the same counts and the same branch point: each module keeps its
        number of layers, drawn uniformly from the layers at or after the branch; the module(s)
        that held the branch layer keep it (the control of the paper's Table 2, with the post-branch
        cost held equal)."""
        rng = _random.Random(seed)
        b = self.branch_layer
        if b is None:
            return self._with([], [], "random")
        after = list(range(b + 1, self.depth))

        def draw(chosen: list[int]) -> list[int]:
            if not chosen:
                return []
            if b in chosen:
                return [b, *rng.sample(after, len(chosen) - 1)]
            return rng.sample([b, *after], len(chosen))

        tm, te = draw(self.modulation_layers), draw(self.expansion_layers)
        if b not in tm and b not in te:  # both drew past the branch: give it back to one
            (tm if tm else te)[0] = b
        return self._with(tm, te, "random")

    def reverse(self) -> TokenPlan:
        """The same counts on the lowest-conflict layers (the paper's "reverse", Table 2)."""
        if self.report is None:
            raise ValueError("a reverse plan needs the conflict rates: build the plan by analysis")
        rr, nr = self.report.range_rates, self.report.null_rates

        def lowest(rates: Sequence[float], count: int) -> list[int]:
            order = sorted(range(self.depth), key=lambda d: (rates[d], d))
            return sorted(order[:count])

        return self._with(
            lowest(rr, len(self.modulation_layers)),
            lowest(nr, len(self.expansion_layers)),
            "reverse",
        )

    def swapped(self) -> TokenPlan:
        """Task tokens on the modulation layers and modulation on the token layers (Table 13)."""
        return self._with(self.expansion_layers, self.modulation_layers, "swapped")

    def modulation_only(self) -> TokenPlan:
        """The modulation layers alone (Table 1, "TM")."""
        return self._with(self.modulation_layers, [], "modulation only")

    def tokens_only(self) -> TokenPlan:
        """The task-token layers alone (Table 1, "TE")."""
        return self._with([], self.expansion_layers, "tokens only")

    def as_dict(self) -> dict[str, Any]:
        out = {
            "selection": self.selection,
            "depth": self.depth,
            "dims": self.dims,
            "sequence_length": self.sequence_length,
            "branch_layer": self.branch_layer,
            **self.expansion.as_dict(),
        }
        if self.report is not None:
            out["range_rates"] = list(self.report.range_rates)
            out["null_rates"] = list(self.report.null_rates)
        if self.stability is not None:
            out["stability"] = asdict(self.stability)
        return out

    def to_markdown(self) -> str:
        head = (
            f"plan ({self.selection}): token modulation on {self.modulation_layers}, task tokens "
            f"on {self.expansion_layers} ({self.expansion.tokens_per_task} per task"
            f"{', gated' if self.expansion.gated else ''}), branch at block {self.branch_layer} "
            f"of {self.depth}, predicted block compute {self.predicted_multiplier:.2f}×"
        )
        parts = [head]
        if self.report is not None:
            report = copy.deepcopy(self.report)
            report.modulation_layers = self.modulation_layers
            report.expansion_layers = self.expansion_layers
            report.predicted_multiplier = self.predicted_multiplier
            parts.append(report.to_markdown())
        if self.stability is not None:
            parts.append(self.stability.to_markdown())
        return "\n\n".join(parts)


def plan_expansion(
    model: nn.Module,
    batches: Iterable[Any],
    task_losses: Callable[[Any], Sequence[Tensor] | Mapping[str, Tensor]],
    *,
    blocks: nn.Module | Sequence[nn.Module] | None = None,
    num_tasks: int | None = None,
    rho: float = 0.5,
    r: float = 100.0,
    split_rule: SplitRule = "ratio",
    tokens_per_task: int = 6,
    modulation: bool = True,
    expansion: bool = True,
    gated: bool = True,
    budget: float | None = None,
    layers: Sequence[int] | None = None,
    eval_mode: bool = True,
    bootstrap: int = 200,
    disjoint: int = 0,
    seed: int = 0,
) -> TokenPlan:
    """DTME's offline analysis (Alg. 1, App. B.3) and the plan it ranks, with its stability.

    ``batches`` (re-iterable: a list, or a DataLoader without shuffling) is read twice: the token
    covariance of every block input first (no gradients), then every task's gradient with respect
    to the block inputs (one backward pass per task) and the range/null conflict counts, kept per
    batch. The model runs in eval mode (the paper's recommendation: no dropout) unless
    ``eval_mode=False``; its modes are restored and nothing else changes. Layers are chosen as in
    :func:`mtlopt.tokens.choose_layers` (``rho``, ``budget``, ``layers``). ``bootstrap`` resamples
    of the batches (and ``disjoint`` disjoint subsets, if > 1) give :class:`PlanStability`.
    """
    chosen_blocks = find_blocks(model if blocks is None else blocks)
    batches = list(batches)
    if not batches:
        raise ValueError("plan_expansion needs at least one batch")
    if disjoint == 1 or disjoint < 0 or disjoint > len(batches):
        raise ValueError(f"disjoint must be 0 or 2..{len(batches)} (the batches), got {disjoint}")
    modes = [(m, m.training) for m in model.modules()]
    if eval_mode:
        model.eval()
    analysis = TokenSpaceAnalysis(chosen_blocks, num_tasks, r, split_rule)
    per_batch: list[dict[str, np.ndarray]] = []
    try:
        length = 0
        with torch.no_grad():
            for batch in batches:
                task_losses(batch)
                tokens = analysis.taps.batch_first(analysis.taps.captured())
                length = int(tokens[0].shape[1])
                analysis.observe_tokens()
        analysis.fit_spaces()
        for batch in batches:
            losses = task_losses(batch)
            values = list(losses.values()) if isinstance(losses, Mapping) else list(losses)
            staged = analysis.stage_gradients(values, retain_graph=False)
            per_batch.append(staged[1])
            analysis.commit(staged)
        report = analysis.report()
    finally:
        analysis.close()
        for module, mode in modes:
            module.training = mode
    k = analysis.num_tasks
    assert k is not None
    depth = len(chosen_blocks)

    def choose(range_rates: Sequence[float], null_rates: Sequence[float]) -> ExpansionPlan:
        return choose_layers(
            range_rates,
            null_rates,
            k,
            rho,
            tokens_per_task,
            length,
            modulation=modulation,
            expansion=expansion,
            budget=budget,
            layers=layers,
            gated=gated,
        )

    plan = choose(report.range_rates, report.null_rates)
    report.modulation_layers = plan.modulation_layers
    report.expansion_layers = plan.expansion_layers
    report.predicted_multiplier = plan.predicted_multiplier
    stability = None
    if bootstrap > 0 or disjoint > 1:
        stability = _stability(per_batch, depth, k, plan, report, choose, bootstrap, disjoint, seed)
    return TokenPlan(plan, depth, list(report.dims), length, report, stability, "conflict")


def _rates(parts: Sequence[dict[str, np.ndarray]], depth: int, k: int) -> tuple[np.ndarray, ...]:
    counts = ConflictCounts(depth, k)
    for part in parts:
        counts.add_increments(part)
    return counts.rates()


def _margin(rates: np.ndarray, chosen: Sequence[int], candidates: Sequence[int]) -> float:
    rest = [d for d in candidates if d not in chosen]
    if not chosen or not rest:
        return float("nan")
    return float(min(rates[d] for d in chosen) - max(rates[d] for d in rest))


def _stability(
    per_batch: list[dict[str, np.ndarray]],
    depth: int,
    k: int,
    plan: ExpansionPlan,
    report: ConflictReport,
    choose: Callable[[Sequence[float], Sequence[float]], ExpansionPlan],
    bootstrap: int,
    disjoint: int,
    seed: int,
) -> PlanStability:
    rng = np.random.default_rng(seed)
    n = len(per_batch)
    tm_hits, te_hits = np.zeros(depth), np.zeros(depth)
    range_samples, null_samples, tm_margins, te_margins = [], [], [], []
    same = 0
    # The margins compare the full-data plan's chosen layers with the candidates it left out.
    tm_candidates = sorted(set(range(depth)) - set(plan.modulation_layers)) + list(
        plan.modulation_layers
    )
    te_candidates = sorted(set(range(depth)) - set(plan.expansion_layers)) + list(
        plan.expansion_layers
    )
    if plan.branch_layer is not None:  # only layers the budget/candidates allowed could compete
        allowed = _allowed(plan, report, choose)
        tm_candidates = [d for d in tm_candidates if d in allowed]
        te_candidates = [d for d in te_candidates if d in allowed]
    for _ in range(bootstrap):
        pick = rng.integers(0, n, n)
        rr, nr = _rates([per_batch[i] for i in pick], depth, k)
        resampled = choose(rr.tolist(), nr.tolist())
        tm_hits[resampled.modulation_layers] += 1
        te_hits[resampled.expansion_layers] += 1
        same += (resampled.modulation_layers, resampled.expansion_layers) == (
            plan.modulation_layers,
            plan.expansion_layers,
        )
        range_samples.append(rr)
        null_samples.append(nr)
        tm_margins.append(_margin(rr, plan.modulation_layers, tm_candidates))
        te_margins.append(_margin(nr, plan.expansion_layers, te_candidates))
    full_rr, full_nr = np.array(report.range_rates), np.array(report.null_rates)

    def interval(samples: list, full: np.ndarray) -> list[tuple[float, float]]:
        if not samples:
            return [(float(v), float(v)) for v in full]
        low, high = np.percentile(np.array(samples), [2.5, 97.5], axis=0)
        return [(float(a), float(b)) for a, b in zip(low, high, strict=True)]

    def margin(samples: list[float], full: float) -> tuple[float, float, float]:
        values = np.array([s for s in samples if not np.isnan(s)])
        if np.isnan(full) or values.size == 0:
            return (full, full, full)
        low, high = np.percentile(values, [2.5, 97.5])
        return (full, float(low), float(high))

    disjoint_plans = []
    if disjoint > 1:
        for part in np.array_split(np.arange(n), disjoint):
            rr, nr = _rates([per_batch[i] for i in part], depth, k)
            sub = choose(rr.tolist(), nr.tolist())
            disjoint_plans.append((list(sub.modulation_layers), list(sub.expansion_layers)))
    total = max(bootstrap, 1)
    return PlanStability(
        resamples=bootstrap,
        batches=n,
        modulation_frequency=(tm_hits / total).tolist(),
        expansion_frequency=(te_hits / total).tolist(),
        range_interval=interval(range_samples, full_rr),
        null_interval=interval(null_samples, full_nr),
        modulation_margin=margin(
            tm_margins, _margin(full_rr, plan.modulation_layers, tm_candidates)
        ),
        expansion_margin=margin(
            te_margins, _margin(full_nr, plan.expansion_layers, te_candidates)
        ),
        agreement=same / total if bootstrap else float("nan"),
        disjoint_plans=disjoint_plans,
    )


def _allowed(
    plan: ExpansionPlan,
    report: ConflictReport,
    choose: Callable[[Sequence[float], Sequence[float]], ExpansionPlan],
) -> set[int]:
    """The layers the budget and the candidate list let compete: those a plan ranked on all-equal
    rates (ties to the earliest) and on reversed rates can reach."""
    depth = len(report.range_rates)
    reached: set[int] = set()
    for d in range(depth):
        one_hot = [1.0 if e == d else 0.0 for e in range(depth)]
        probe = choose(one_hot, one_hot)
        if d in probe.modulation_layers or d in probe.expansion_layers:
            reached.add(d)
    return reached
