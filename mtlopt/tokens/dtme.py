"""DTME-MTL: dynamic token modulation and expansion."""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..engine import TaskGradients, task_gradients
from ..registry import create, register
from ..strategies.base import GradientStrategy, LossStrategy, TokenStrategy
from .analysis import TokenSpaceAnalysis
from .budget import DEFAULT_PLAN_WARNING, choose_layers
from .expansion import Expansion, ExpansionPlan, expand
from .plan import TokenPlan
from .report import ConflictReport
from .space import SplitRule
from .stream_calls import take_record
from .stream_gradients import stream_task_gradients
from .streams import STREAMS, single_task
from .taps import disable_nested_tensor, find_blocks
from .validate import validate_blocks

logger = logging.getLogger("mtlopt")


@register(
    "dtme",
    kind="token",
    cost="1 + T backward (analysis), then T streams after the branch",
    stateful=True,
    paper="Jeong & Yoon, Resolving Token-Space Gradient Conflicts: Token Space Manipulation for "
    "Transformer-Based Multi-Task Learning (DTME-MTL), ICCV 2025, arXiv 2507.07485",
    conventions="r=100 read as range energy ≥ r × null energy; rho=0.5; 6 tokens per task per TE "
    "layer; identity-initialised modulation; analysis on the first 100 training steps (covariance "
    "from the first 10, conflicts from the other 90) over real tokens only; K weight-sharing task "
    "streams from the first modified block; base strategy EW. Cost: K extra token-gradient passes "
    "per step during the analysis only, then the base strategy's cost with K streams after the "
    "branch, c(b) = (b + K(D - b))/D of the block compute for branch b over D blocks (predicted in the "
    "plan, bounded by budget=)",
)
class DTME(TokenStrategy):
    """DTME-MTL (Jeong & Yoon, ICCV 2025; Alg. 1, Secs. 3.2–3.4, App. B.3).

    Schedule, driven by the optimizer's steps: ``warmup_steps`` ordinary steps; then an analysis on
    the next ``analysis_steps`` training steps, from the losses passed to ``step``: the token
    covariance of every block input over the first ``covariance_steps`` of them, the range/null
    split (ratio ``r``), and the conflict rates of the task gradients with respect to the block
    inputs in both spaces over the rest, counted over real tokens only (padding excluded by the
    blocks' masks); then one expansion: token modulation (per-task affine, identity-initialised) on
    the ``round(rho·D)`` layers with the highest range-space conflict rate, ``tokens_per_task`` task
    tokens on the ``round(rho·D)`` layers with the highest null-space conflict rate (a layer can get
    both), inside the layers that ``budget`` and ``layers`` allow (:mod:`mtlopt.tokens.budget`).
    From the first modified block on the blocks run K weight-sharing streams stacked task-major on
    the batch axis; heads read their stream with :func:`mtlopt.task_view`. The new parameters join
    the wrapped optimizer in two groups with the hyperparameters of the group that holds the
    blocks: the modulation without weight decay (it decays towards 0, not the identity), the
    tokens as they are. Throughout, ``base`` (any registered loss or gradient strategy) combines the
    task losses, so "DTME then Nash-MTL" is ``create("dtme", ..., base="nash_mtl")``.

    The first training step replays every block as task streams on its real arguments
    (:mod:`mtlopt.tokens.validate`): an unsupported layout fails there, before the analysis.

    Restoring: create the fresh model, optimizer and DTME, ``opt.load_state_dict(saved)`` (which
    re-applies the expansion), then ``model.load_state_dict(saved_model)``.

    Args:
        blocks: the transformer blocks, or a model whose blocks :func:`find_blocks` can locate
            (default: ``model``'s).
        num_tasks: K (default: the number of losses of the first step).
        base: name of the strategy that combines the task losses (default ``"ew"``).
        base_kwargs: its hyperparameters.
        model: the module whose forward runs the blocks and the heads; its blocks are found when
            ``blocks`` is not given, parameter percentages are reported against it, and a forward
            hook checks that the heads call ``task_view`` after the expansion.
        rho: fraction of layers that get each module (default 0.5).
        r: range/null energy ratio (default 100).
        split_rule: ``"ratio"`` (default) or ``"absolute"`` (see :func:`~mtlopt.tokens.split_rank`).
        tokens_per_task: task tokens per task per expanded layer (default 6).
        modulation: add token modulation (switch off for ablations).
        expansion: add task tokens (switch off for ablations).
        warmup_steps: ordinary steps before the analysis (default 0).
        analysis_steps: training steps the analysis spans (default 100).
        covariance_steps: the first of them used for the covariance (default 10).
        budget: the largest predicted block-compute multiplier of the expanded model (e.g. 2.0);
            default none (a plan predicted above 3× is warned about).
        layers: the candidate layers (default all).
        seed: seed of the generator the task tokens are drawn from (default: derived from
            ``torch.initial_seed()``); saved in the state, so a restored run draws the same tokens.
        mask_conventions: for boolean masks whose name DTME does not know, whether ``True`` means
            ``"true_attends"`` or ``"true_masks"``, by argument name.
        stream_gradients: with a gradient base, after the expansion, take every task's gradient
            from one backward through the K streams plus K passes through the blocks before the
            branch (:mod:`mtlopt.tokens.stream_gradients`), the blocks after the branch called once
            per stream; ``False``: one backward per task through all K streams (O(K²)). Checked
            against the per-task path on its first step; where it does not apply, DTME says why
            once (a warning) and takes the per-task path. :attr:`gradient_path` tells which ran.
        plan: a :class:`~mtlopt.tokens.TokenPlan` (from :func:`~mtlopt.tokens.plan_expansion`, the
            paper's offline analysis at iteration 0, or explicit) or an
            :class:`~mtlopt.tokens.ExpansionPlan`: the model is expanded at construction, with
            the modules present from step 0, and no analysis runs during training.
        gated_tokens: the task tokens' contribution passes through a per-task gate initialised
            closed (:class:`~mtlopt.tokens.TokenGate`), so the expanded model starts exactly, bit
            for bit, at the current one (default); ``False`` gives the paper's ungated tokens.
            With ``plan=``, the plan's own setting is used.
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
        budget: float | None = None,
        layers: Sequence[int] | None = None,
        seed: int | None = None,
        mask_conventions: Mapping[str, str] | None = None,
        stream_gradients: bool = True,
        plan: TokenPlan | ExpansionPlan | None = None,
        gated_tokens: bool = True,
    ) -> None:
        if plan is not None:
            given = plan.num_tasks
            if num_tasks is not None and num_tasks != given:
                raise ValueError(f"num_tasks={num_tasks} but the plan is of {given} tasks")
            num_tasks = given
        super().__init__(num_tasks)
        if blocks is None:
            if model is None:
                raise ValueError("dtme needs blocks= or model= to find the transformer blocks")
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
        if budget is not None and budget < 1.0:
            raise ValueError(f"budget is a compute multiplier (≥ 1), got {budget}")
        self.conventions = _conventions(mask_conventions)
        if model is not None:
            disable_nested_tensor(model)
        self.blocks = find_blocks(blocks)
        if layers is not None and any(not 0 <= d < len(self.blocks) for d in layers):
            raise ValueError(f"layers must lie in [0, {len(self.blocks)}), got {list(layers)}")
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
        self.budget = budget
        self.layers = None if layers is None else sorted(set(layers))
        self.gated_tokens = gated_tokens
        self.seed = int(torch.initial_seed() % 2**62) if seed is None else int(seed)
        self.steps = 0
        self.sequence_length = 0
        self.validated = False
        self.report: ConflictReport | None = None
        self.plan: ExpansionPlan | None = None
        self.token_plan: TokenPlan | None = None
        self._pending: list[tuple[str, Any]] = []
        self._first: tuple[int, int] | None = None
        self._expansion: Expansion | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self.stream_gradients = stream_gradients
        self.gradient_path = "per task"
        """``"streams"`` (one K-stream backward), or ``"per task"`` with the reason it was taken."""
        self._streams_checked = False
        self._groups_added = False
        self._analysis: TokenSpaceAnalysis | None = None
        if plan is not None:
            self._apply_given(plan)
            return
        self._analysis = TokenSpaceAnalysis(
            self.blocks, num_tasks, r, split_rule, mask_conventions=self.conventions
        )
        self._analysis.taps.keep_calls = True

    def _apply_given(self, given: TokenPlan | ExpansionPlan) -> None:
        """Expand now by a plan made before training (the paper's iteration-0 protocol)."""
        depth = len(self.blocks)
        token_plan = (
            given
            if isinstance(given, TokenPlan)
            else TokenPlan(given, depth, None, 0, None, None, "explicit")
        )
        plan = token_plan.expansion
        if token_plan.depth != depth:
            raise ValueError(f"the plan is for {token_plan.depth} blocks; this model has {depth}")
        chosen = [*plan.modulation_layers, *plan.expansion_layers]
        if any(not 0 <= d < depth for d in chosen):
            raise ValueError(f"the plan's layers must lie in [0, {depth}), got {sorted(chosen)}")
        dims = token_plan.dims or [_width(block, d) for d, block in enumerate(self.blocks)]
        self.token_plan, self.plan = token_plan, plan
        self.sequence_length = token_plan.sequence_length
        self.validated = True
        report = copy.deepcopy(token_plan.report) or ConflictReport(
            range_rates=[], null_rates=[], range_ranks=[], dims=list(dims), tokens_seen=[]
        )
        report.dims = list(dims)
        report.parameters_before = self._parameter_count()
        self._apply(dims=dims)
        report.modulation_layers = list(plan.modulation_layers)
        report.expansion_layers = list(plan.expansion_layers)
        report.predicted_multiplier = plan.predicted_multiplier
        report.parameters_added = sum(p.numel() for p in self._expansion.parameters())  # type: ignore[union-attr]
        self.report = report

    def hyperparameters(self) -> dict[str, object]:
        return {
            "base": self.base.info.name,
            "rho": self.rho,
            "r": self.r,
            "tokens_per_task": self.tokens_per_task,
            "analysis_steps": self.analysis_steps,
            "budget": self.budget,
            "stream_gradients": self.stream_gradients,
            "gated_tokens": self.gated_tokens if self.plan is None else self.plan.gated,
            "plan": None if self.token_plan is None else self.token_plan.selection,
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

    def single_task(self, task: int):
        """Context manager: inference for task ``task`` alone (its stream only, about the cost of
        the model before the expansion); see :func:`mtlopt.tokens.single_task`."""
        if self.num_tasks is not None and not 0 <= task < self.num_tasks:
            raise IndexError(f"task {task} out of range for {self.num_tasks} tasks")
        return single_task(task)

    def _streams_wanted(self) -> bool:
        return (
            self.stream_gradients
            and isinstance(self.base, GradientStrategy)
            and (self.num_tasks or 0) > 1
        )

    def task_gradients(
        self, losses: list[Tensor], trainable: list[Tensor], partition: Any
    ) -> TaskGradients | None:
        """After the expansion with a gradient base: every task's gradient from one backward
        through the K streams (:mod:`mtlopt.tokens.stream_gradients`); ``None`` before it, with
        ``stream_gradients=False``, or where that does not apply (said once, in a warning)."""
        record = take_record()
        if self._expansion is None or not self._streams_wanted():
            return None
        found = stream_task_gradients(losses, trainable, partition, record)
        if isinstance(found, str):
            self._per_task(found)
            return None
        if not self._streams_checked:  # once: the streams must be separable on this model
            expected = task_gradients(losses, trainable, partition)
            if not _same_gradients(found, expected):
                self._per_task(
                    "the task gradients from the streams differ from the per-task ones (does a "
                    "layer after the blocks mix the rows of different streams?)",
                    permanent=True,
                )
                return expected
            self._streams_checked = True
        self.gradient_path = "streams"
        return found

    def _per_task(self, reason: str, permanent: bool = False) -> None:
        """Fall back on one backward per task for this step (``permanent``: from now on)."""
        if self.gradient_path != f"per task: {reason}":
            warnings.warn(
                f"DTME takes one backward per task through all {self.num_tasks} streams (O(K²)) "
                f"instead of one for all: {reason}",
                stacklevel=4,
            )
        self.gradient_path = f"per task: {reason}"
        if permanent:
            self.stream_gradients = False
            if self._expansion is not None:
                self._expansion.call_per_stream(False)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        self._optimizer = optimizer
        if self._expansion is not None:
            self._add_param_groups()

    def check_num_tasks(self, num_tasks: int) -> None:
        if self.num_tasks is None:
            return
        super().check_num_tasks(num_tasks)

    def observe(self, losses: list[Tensor]) -> None:
        self.check_num_tasks(len(losses))
        phase = self.phase
        if phase == "expanded":
            if self.model is None and STREAMS.branched and STREAMS.views == 0:
                raise RuntimeError(_NO_TASK_VIEW)
            return
        analysis = self._analysis
        assert analysis is not None
        if self._new_window():
            self._pending = []
            self._first = None
        if not self.validated and self._first is None:
            self._first = (self._validate(analysis), len(losses))
        if phase == "conflicts":
            analysis.set_num_tasks(self.num_tasks or len(losses))
        if phase == "covariance":
            self._pending.append(analysis.stage_tokens())
        elif phase == "conflicts":
            self._pending.append(analysis.stage_gradients(losses, retain_graph=True))
        else:
            analysis.taps.clear()

    def _validate(self, analysis: TokenSpaceAnalysis) -> int:
        """Replay the blocks as streams (:mod:`.validate`); the sequence length. Nothing is
        recorded until the step succeeds (:meth:`after_step`)."""
        taps = analysis.taps
        inputs = taps.captured()
        validate_blocks(
            self.blocks,
            taps.calls,
            task_tokens=self.expansion and self.tokens_per_task > 0,
            conventions=self.conventions,
        )
        return int(inputs[0].shape[taps.axes[0] ^ 1])

    def _new_window(self) -> bool:
        """Whether this is the first backward of a step (not a further micro-batch of one)."""
        window = getattr(self._optimizer, "_window", None)
        return window is None or getattr(window, "info", None) is None

    def after_step(self) -> None:
        if self._expansion is not None:
            return
        assert self._analysis is not None
        if self._first is not None:  # the first successful step fixes K and the layout
            self.sequence_length, tasks = self._first
            self.num_tasks = self.num_tasks or tasks
            self.validated = True
            self._analysis.taps.keep_calls = False
            self._analysis.taps.calls = [None] * len(self.blocks)
            self._first = None
        replicas = getattr(self._optimizer, "_replicas", None)
        staged = _merge(self._pending)
        if replicas is not None and staged is not None:
            staged = _sum_over_ranks(staged, replicas.group)
        if staged is not None:
            self._analysis.commit(staged)
        self._pending = []
        self.steps += 1
        if self.steps == self.warmup_steps + self.covariance_steps:
            if self._analysis.covariance.samples == 0:
                raise RuntimeError("DTME analysis had zero usable batches for the covariance")
            self._analysis.fit_spaces()
        elif self.steps == self.warmup_steps + self.analysis_steps:
            counts = self._analysis.counts
            if counts is None or not np.all(counts.tokens > 0):
                raise RuntimeError(
                    "DTME analysis had zero usable batches: no task losses reached step() during "
                    "the conflict-counting steps"
                )
            self._finish_analysis()

    # Analysis → expansion ------------------------------------------------------------------------
    def _finish_analysis(self) -> None:
        assert self._analysis is not None and self.num_tasks is not None
        report = self._analysis.report()
        self.plan = choose_layers(
            report.range_rates,
            report.null_rates,
            self.num_tasks,
            self.rho,
            self.tokens_per_task,
            self.sequence_length,
            modulation=self.modulation,
            expansion=self.expansion,
            budget=self.budget,
            layers=self.layers,
            gated=self.gated_tokens,
        )
        report.parameters_before = self._parameter_count()
        self._apply(dims=report.dims)
        report.modulation_layers = self.plan.modulation_layers
        report.expansion_layers = self.plan.expansion_layers
        report.predicted_multiplier = self.plan.predicted_multiplier
        report.parameters_added = sum(p.numel() for p in self._expansion.parameters())  # type: ignore[union-attr]
        self.report = report
        logger.info("DTME analysis after %d steps:\n%s", self.steps, report.to_markdown())
        if self.budget is None and self.plan.predicted_multiplier > DEFAULT_PLAN_WARNING:
            warnings.warn(
                f"DTME's plan is predicted to cost {self.plan.predicted_multiplier:.1f}× the "
                f"block compute of the model before the expansion ({self.num_tasks} task streams "
                f"from block {self.plan.branch_layer} of {len(self.blocks)}); bound it with "
                "budget= (e.g. budget=2.0) or layers=",
                stacklevel=2,
            )

    def _apply(self, dims: Sequence[int]) -> None:
        assert self.plan is not None
        generator = torch.Generator().manual_seed(self.seed)
        self._expansion = expand(self.blocks, self.plan, list(dims), generator, self.conventions)
        self._expansion.call_per_stream(self._streams_wanted())
        if self._analysis is not None:
            self._analysis.close()
            self._analysis = None
        if self._optimizer is not None:
            self._add_param_groups()
        if self.model is not None:
            # Scope the stream context to this model's forward pass, so that task_view in another
            # model's forward (or after this one) never sees this model's streams.
            self._expansion.handles += [
                self.model.register_forward_pre_hook(
                    lambda module, args: STREAMS.reset(scoped=True)
                ),
                self.model.register_forward_hook(_check_task_view),
            ]

    def _add_param_groups(self) -> None:
        """The new parameters join the wrapped optimizer with the hyperparameters of the group
        that holds the blocks: the modulation (decay would pull W towards 0, not the identity)
        and the gates (decay would close them again) without weight decay, the tokens as they
        are."""
        assert self._optimizer is not None and self._expansion is not None
        if self._groups_added:
            return
        modulation = self._expansion.modulation_parameters() + self._expansion.gate_parameters()
        tokens = self._expansion.token_parameters()
        new = {id(p) for p in modulation + tokens}
        block_ids = {id(p) for b in self.blocks for p in b.parameters()} - new
        groups = self._optimizer.param_groups
        home = next(
            (g for g in groups if any(id(p) in block_ids for p in g["params"])), groups[0]
        )
        hyper = {k: v for k, v in home.items() if k != "params"}
        # With plan=, an optimizer built after the strategy already holds the new parameters
        # (they are sub-modules of the blocks): they move to their own groups.
        state = self._optimizer.state
        if any(id(p) in new and p in state for g in groups for p in g["params"]):
            raise RuntimeError(
                "the optimizer already has state for DTME's new parameters; build the optimizer "
                "and the DTME strategy before the first step"
            )
        for group in groups:
            group["params"] = [p for p in group["params"] if id(p) not in new]
        if modulation:
            self._optimizer.add_param_group({**hyper, "params": modulation, "weight_decay": 0.0})
        if tokens:
            self._optimizer.add_param_group({**hyper, "params": tokens})
        self._groups_added = True

    def _parameter_count(self) -> int:
        if self.model is not None:
            return sum(p.numel() for p in self.model.parameters())
        if self._optimizer is not None:
            seen = {id(p): p for g in self._optimizer.param_groups for p in g["params"]}
            return sum(p.numel() for p in seen.values())
        return 0

    # State (tensors and Python primitives only) -------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "strategy": "dtme",
            "num_tasks": self.num_tasks,
            "num_blocks": len(self.blocks),
            "steps": self.steps,
            "seed": self.seed,
            "sequence_length": self.sequence_length,
            "validated": self.validated,
            "base": self.base.state_dict(),
            "analysis": None if self._analysis is None else self._analysis.state_dict(),
            "plan": None if self.plan is None else self.plan.as_dict(),
            "report": None if self.report is None else self.report.as_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Validates the whole checkpoint first; on an error nothing has changed."""
        if not isinstance(state, Mapping) or state.get("strategy") != "dtme":
            found = state.get("strategy") if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(
                f"not a DTME checkpoint (strategy {found!r}); load a checkpoint saved by dtme"
            )
        required = {
            "num_tasks",
            "num_blocks",
            "steps",
            "seed",
            "base",
            "analysis",
            "plan",
            "report",
        }
        missing = required - set(state)
        if missing:
            raise KeyError(f"DTME state is missing {sorted(missing)}")
        k = state["num_tasks"]
        if self.num_tasks is not None and k is not None and k != self.num_tasks:
            raise ValueError(f"the checkpoint is of {k} tasks; this DTME has {self.num_tasks}")
        if state["num_blocks"] != len(self.blocks):
            raise ValueError(
                f"the checkpoint's model has {state['num_blocks']} blocks; this one {len(self.blocks)}"
            )
        plan = report = None
        if state["plan"] is not None:
            plan = ExpansionPlan(**{"gated": False, **state["plan"]})  # older states: ungated
            fields = {f for f in ConflictReport.__dataclass_fields__}
            report = ConflictReport(**{k2: v for k2, v in state["report"].items() if k2 in fields})
            if len(report.dims) != len(self.blocks):
                raise ValueError("the checkpoint's report does not match this model's blocks")
        if plan is not None and self._expansion is not None and plan != self.plan:
            raise RuntimeError(
                "this DTME has already expanded its model by another plan; load into a fresh one "
                "(created without plan=, or with the checkpoint's plan)"
            )
        copy.deepcopy(self.base).load_state_dict(state["base"])  # raises before any change
        if plan is None and state["analysis"] is not None and self._analysis is not None:
            self._analysis.load_state_dict(state["analysis"])  # validates, then loads
        self.base.load_state_dict(state["base"])
        self.num_tasks = k if k is not None else self.num_tasks
        self.steps, self.seed = int(state["steps"]), int(state["seed"])
        self.sequence_length = int(state.get("sequence_length", 0))
        self.validated = bool(state.get("validated", False))
        self._pending = []
        if self._analysis is not None and self.validated:
            self._analysis.taps.keep_calls = False
        if plan is not None and self._expansion is None:
            self.plan, self.report = plan, report
            assert report is not None
            self._apply(dims=report.dims)


def _same_gradients(found: TaskGradients, expected: TaskGradients) -> bool:
    """Whether two sets of per-task gradients agree to floating-point tolerance."""

    def close(a: Tensor, b: Tensor) -> bool:
        if a.shape != b.shape:
            return False
        if b.numel() == 0:
            return True
        return float((a - b).abs().max()) <= 1e-3 * float(b.abs().max()) + 1e-30

    if not close(found.jacobian, expected.jacobian):
        return False
    for mine, theirs in zip(found.own, expected.own, strict=True):
        for pid, g in theirs.items():
            other = mine.get(pid)
            if other is None:
                if bool(g.any()):
                    return False
            elif not close(other, g):
                return False
    return True


def _width(block: nn.Module, index: int) -> int:
    """A block's token width, read from its first LayerNorm (or its first Linear's input)."""
    for module in block.modules():
        if isinstance(module, nn.LayerNorm):
            return int(module.normalized_shape[-1])
    for module in block.modules():
        if isinstance(module, nn.Linear):
            return int(module.in_features)
    raise ValueError(
        f"cannot read the token width of block {index} ({type(block).__name__}); give the plan "
        "its widths (TokenPlan.explicit(..., dims=[...]))"
    )


def _merge(pending: list[tuple[str, Any]]) -> tuple[str, Any] | None:
    """One staged observation from a step's micro-batches (all of one kind: a step is in one
    phase)."""
    if not pending:
        return None
    kind = pending[0][0]
    if kind == "tokens":
        sums = [sum(parts) for parts in zip(*(v[0] for _, v in pending), strict=True)]
        return kind, (sums, sum(v[1] for _, v in pending), pending[-1][1][2])
    return kind, {name: sum(v[name] for _, v in pending) for name in pending[0][1]}


def _sum_over_ranks(staged: tuple[str, Any], group: Any) -> tuple[str, Any]:
    """The step's statistics summed over data-parallel ranks (one ``all_reduce``), so that every
    rank fits the same spaces and chooses the same plan as one process on the union batch."""
    import torch.distributed as dist

    kind, value = staged
    if kind == "tokens":
        parts = [*value[0], torch.tensor([float(value[1])], dtype=torch.float64)]
    else:
        parts = [torch.from_numpy(np.asarray(value[name], dtype=np.float64)) for name in value]
    flat = torch.cat([p.reshape(-1).double() for p in parts])
    dist.all_reduce(flat, group=group)
    pieces = flat.split([p.numel() for p in parts])
    if kind == "tokens":
        sums = [piece.view_as(p) for piece, p in zip(pieces[:-1], parts[:-1], strict=True)]
        return kind, (sums, round(float(pieces[-1])), value[2])
    return kind, {
        name: piece.view_as(p).numpy().copy()
        for name, piece, p in zip(value, pieces, parts, strict=True)
    }


def _conventions(given: Mapping[str, str] | None) -> dict[str, bool]:
    out = {}
    for name, value in (given or {}).items():
        if value not in ("true_attends", "true_masks"):
            raise ValueError(
                f"mask_conventions[{name!r}] must be 'true_attends' or 'true_masks', got {value!r}"
            )
        out[name] = value == "true_attends"
    return out


_NO_TASK_VIEW = (
    "DTME has expanded the model into K task streams stacked on the batch axis, but the heads "
    "never called mtlopt.task_view(x, i), so they received K·B samples instead of B. In each "
    "head, read its task's stream first: features = mtlopt.task_view(features, task_index)."
)


def _check_task_view(module: nn.Module, args: tuple, output: object) -> None:
    unviewed = STREAMS.branched and STREAMS.views == 0
    STREAMS.reset(scoped=False)
    if unviewed:
        raise RuntimeError(_NO_TASK_VIEW)
