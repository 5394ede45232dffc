"""DTME-MTL: dynamic token modulation and expansion."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..registry import create, register
from ..strategies.base import GradientStrategy, LossStrategy, TokenStrategy
from .analysis import TokenSpaceAnalysis
from .expansion import Expansion, ExpansionPlan, expand
from .report import ConflictReport
from .space import SplitRule
from .streams import STREAMS
from .taps import find_blocks

logger = logging.getLogger("mtlopt")


@register(
    "dtme",
    kind="token",
    cost="1 backward",
    stateful=True,
    paper="Jeong & Yoon, Resolving Token-Space Gradient Conflicts: Token Space Manipulation for "
    "Transformer-Based Multi-Task Learning (DTME-MTL), ICCV 2025, arXiv 2507.07485",
    conventions="r=100 read as range energy ≥ r × null energy; rho=0.5; 6 tokens per task per TE "
    "layer; identity-initialised modulation; analysis on the first 100 training steps (covariance "
    "from the first 10, conflicts from the other 90); K weight-sharing task streams from the first "
    "modified block; base strategy EW. Cost: T extra token-gradient passes during the analysis "
    "only, then the base strategy's cost with K streams after the branch",
)
class DTME(TokenStrategy):
    """DTME-MTL (Jeong & Yoon, ICCV 2025; Alg. 1, Secs. 3.2–3.4, App. B.3).

    Schedule, driven by the optimizer's steps: ``warmup_steps`` ordinary steps; then an analysis on
    the next ``analysis_steps`` training steps, from the losses passed to ``step``: the token
    covariance of every block input over the first ``covariance_steps`` of them, the range/null
    split (ratio ``r``), and the conflict rates of the task gradients with respect to the block
    inputs in both spaces over the rest; then one expansion: token modulation (per-task affine,
    identity-initialised) on the ``round(rho·D)`` layers with the highest range-space conflict
    rate, ``tokens_per_task`` task tokens on the ``round(rho·D)`` layers with the highest null-space
    conflict rate (a layer can get both). From the first modified block on the blocks run K
    weight-sharing streams stacked task-major on the batch axis; heads read their stream with
    :func:`mtlopt.task_view`. The new parameters join the wrapped optimizer (hyperparameters of
    its first group). Throughout, ``base`` (any registered loss or gradient strategy) combines the
    task losses, so "DTME then Nash-MTL" is ``create("dtme", ..., base="nash_mtl")``.

    Restoring: create the fresh model, optimizer and DTME, ``opt.load_state_dict(saved)`` (which
    re-applies the expansion), then ``model.load_state_dict(saved_model)``.

    Args:
        blocks: the transformer blocks, or a model whose blocks :func:`find_blocks` can locate.
        num_tasks: K.
        base: name of the strategy that combines the task losses (default ``"ew"``).
        base_kwargs: its hyperparameters.
        model: optional; parameter percentages are reported against it and a forward hook checks
            that the heads call ``task_view`` after the expansion.
        rho: fraction of layers that get each module (default 0.5).
        r: range/null energy ratio (default 100).
        split_rule: ``"ratio"`` (default) or ``"absolute"`` (see :func:`~mtlopt.tokens.split_rank`).
        tokens_per_task: task tokens per task per expanded layer (default 6).
        modulation: add token modulation (switch off for ablations).
        expansion: add task tokens (switch off for ablations).
        warmup_steps: ordinary steps before the analysis (default 0).
        analysis_steps: training steps the analysis spans (default 100).
        covariance_steps: the first of them used for the covariance (default 10).
    """

    def __init__(
        self,
        blocks: nn.Module | Sequence[nn.Module] | None = None,
        num_tasks: int | None = None,
        base: str | LossStrategy | GradientStrategy = "ew",
        base_kwargs: dict[str, Any] | None = None,
        *,
        model: nn.Module | None = None,
        rho: float = 0.5,
        r: float = 100.0,
        split_rule: SplitRule = "ratio",
        tokens_per_task: int = 6,
        modulation: bool = True,
        expansion: bool = True,
        warmup_steps: int = 0,
        analysis_steps: int = 100,
        covariance_steps: int = 10,
    ) -> None:
        super().__init__(num_tasks)
        if num_tasks is None:
            raise ValueError("dtme needs num_tasks=")
        if blocks is None:
            if model is None:
                raise ValueError("dtme needs blocks= (or model=) to find the transformer blocks")
            blocks = model
        if not 0 < rho <= 1:
            raise ValueError(f"rho must lie in (0, 1], got {rho}")
        if not 1 <= covariance_steps < analysis_steps:
            raise ValueError(
                f"need 1 <= covariance_steps < analysis_steps, got {covariance_steps} and "
                f"{analysis_steps}: the conflicts are counted on the steps after the covariance"
            )
        if warmup_steps < 0 or tokens_per_task < 0:
            raise ValueError("warmup_steps and tokens_per_task must be non-negative")
        self.blocks = find_blocks(blocks)
        self.base: LossStrategy | GradientStrategy = (
            create(base, num_tasks=num_tasks, **(base_kwargs or {}))
            if isinstance(base, str)
            else base
        )
        if not isinstance(self.base, (LossStrategy, GradientStrategy)):
            raise TypeError("the base of dtme must be a loss or gradient strategy")
        self.model = model
        self.rho, self.r, self.split_rule = rho, r, split_rule
        self.tokens_per_task = tokens_per_task
        self.modulation, self.expansion = modulation, expansion
        self.warmup_steps, self.analysis_steps = warmup_steps, analysis_steps
        self.covariance_steps = covariance_steps
        self.steps = 0
        self.report: ConflictReport | None = None
        self.plan: ExpansionPlan | None = None
        self._analysis: TokenSpaceAnalysis | None = TokenSpaceAnalysis(
            self.blocks, num_tasks, r, split_rule
        )
        self._expansion: Expansion | None = None
        self._optimizer: torch.optim.Optimizer | None = None

    def hyperparameters(self) -> dict[str, object]:
        return {
            "base": self.base.info.name,
            "rho": self.rho,
            "r": self.r,
            "tokens_per_task": self.tokens_per_task,
            "analysis_steps": self.analysis_steps,
        }

    def parameters(self) -> list[nn.Parameter]:
        return self.base.parameters()

    @property
    def phase(self) -> str:
        if self._expansion is not None:
            return "expanded"
        if self.steps < self.warmup_steps:
            return "warmup"
        if self.steps < self.warmup_steps + self.covariance_steps:
            return "covariance"
        return "conflicts"

    def task_parameters(self) -> list[list[nn.Parameter]]:
        return [] if self._expansion is None else self._expansion.task_parameters()

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        self._optimizer = optimizer

    def observe(self, losses: list[Tensor]) -> None:
        self.check_num_tasks(len(losses))
        phase = self.phase
        if phase == "expanded":
            if self.model is None and STREAMS.branched and STREAMS.views == 0:
                raise RuntimeError(_NO_TASK_VIEW)
            return
        assert self._analysis is not None
        if phase == "covariance":
            self._analysis.observe_tokens()
        elif phase == "conflicts":
            self._analysis.observe_gradients(losses, retain_graph=True)
        else:
            self._analysis.taps.clear()

    def after_step(self) -> None:
        if self._expansion is not None:
            return
        self.steps += 1
        assert self._analysis is not None
        if self.steps == self.warmup_steps + self.covariance_steps:
            if self._analysis.covariance.samples == 0:
                raise RuntimeError("DTME analysis had zero usable batches for the covariance")
            self._analysis.fit_spaces()
        elif self.steps == self.warmup_steps + self.analysis_steps:
            if not np.all(self._analysis.counts.tokens > 0):
                raise RuntimeError(
                    "DTME analysis had zero usable batches: no task losses reached step() during "
                    "the conflict-counting steps"
                )
            self._finish_analysis()

    # Analysis → expansion ------------------------------------------------------------------------
    def _finish_analysis(self) -> None:
        assert self._analysis is not None
        report = self._analysis.report()
        depth = len(self.blocks)
        count = max(1, round(self.rho * depth))
        # Highest conflict first; ties go to the earlier layer (a stable sort on -rate).
        tm = sorted(np.argsort(-np.array(report.range_rates), kind="stable")[:count].tolist())
        te = sorted(np.argsort(-np.array(report.null_rates), kind="stable")[:count].tolist())
        self.plan = ExpansionPlan(
            num_tasks=self.num_tasks,  # type: ignore[arg-type]
            modulation_layers=tm if self.modulation else [],
            expansion_layers=te if self.expansion and self.tokens_per_task > 0 else [],
            tokens_per_task=self.tokens_per_task,
        )
        report.parameters_before = self._parameter_count()
        self._apply(dims=report.dims)
        report.modulation_layers = self.plan.modulation_layers
        report.expansion_layers = self.plan.expansion_layers
        report.parameters_added = sum(p.numel() for p in self._expansion.parameters())  # type: ignore[union-attr]
        self.report = report
        logger.info("DTME analysis after %d steps:\n%s", self.steps, report.to_markdown())

    def _apply(self, dims: Sequence[int]) -> None:
        assert self.plan is not None
        dim = dims[self.plan.branch_layer] if self.plan.branch_layer is not None else dims[0]
        self._expansion = expand(self.blocks, self.plan, dim)
        if self._analysis is not None:
            self._analysis.close()
            self._analysis = None
        params = self._expansion.parameters()
        if params and self._optimizer is not None:
            group = {k: v for k, v in self._optimizer.param_groups[0].items() if k != "params"}
            self._optimizer.add_param_group({**group, "params": params})
        if self.model is not None:
            # Scope the stream context to this model's forward pass, so that task_view in another
            # model's forward (or after this one) never sees this model's streams.
            self._expansion.handles += [
                self.model.register_forward_pre_hook(lambda module, args: STREAMS.reset()),
                self.model.register_forward_hook(_check_task_view),
            ]

    def _parameter_count(self) -> int:
        if self.model is not None:
            return sum(p.numel() for p in self.model.parameters())
        if self._optimizer is not None:
            seen = {id(p): p for g in self._optimizer.param_groups for p in g["params"]}
            return sum(p.numel() for p in seen.values())
        return 0

    # State --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "base": self.base.state_dict(),
            "analysis": None if self._analysis is None else self._analysis.state_dict(),
            "plan": None if self.plan is None else vars(self.plan).copy(),
            "report": None if self.report is None else self.report.as_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = state["steps"]
        self.base.load_state_dict(state["base"])
        if state["plan"] is not None:
            if self._expansion is not None:
                raise RuntimeError(
                    "this DTME has already expanded its model; load into a fresh one"
                )
            self.plan = ExpansionPlan(**state["plan"])
            report = state["report"]
            report = {k: v for k, v in report.items() if k != "parameters_added_percent"}
            self.report = ConflictReport(**report)
            self._apply(dims=self.report.dims)
        elif state["analysis"] is not None and self._analysis is not None:
            self._analysis.load_state_dict(state["analysis"])


_NO_TASK_VIEW = (
    "DTME has expanded the model into K task streams stacked on the batch axis, but the heads "
    "never called mtlopt.task_view(x, i), so they received K·B samples instead of B. In each "
    "head, read its task's stream first: features = mtlopt.task_view(features, task_index)."
)


def _check_task_view(module: nn.Module, args: tuple, output: object) -> None:
    unviewed = STREAMS.branched and STREAMS.views == 0
    STREAMS.reset()
    if unviewed:
        raise RuntimeError(_NO_TASK_VIEW)
