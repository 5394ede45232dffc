"""What a benchmark problem provides to the suite's runner."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class Instance:
    """One problem set up for one run: model, data stream, losses and evaluation."""

    model: nn.Module
    batch: Callable[[int], Any]
    losses: Callable[[nn.Module, Any], list[torch.Tensor]]
    evaluate: Callable[[nn.Module], dict[str, float]]
    lr: float = 1e-3
    blocks: Sequence[nn.Module] | None = None
    """The transformer blocks, for token strategies (DTME); ``None`` if the model has none."""
    trace: Callable[[nn.Module], list[float]] | None = None
    """Optional per-step trace (the toy records its parameters)."""
    validation: Callable[[nn.Module, int], list[torch.Tensor]] | None = None
    """``validation(model, step)``: the task losses on the step's validation batch (held out from
    training), for strategies that read a validation signal (CoBa, PIVRG; see the suite's
    ``_signals``). ``None``: the problem has none and those strategies fail with that error."""
    representation: nn.Module | None = None
    """The module whose output is the shared representation (Rep-MTL's saliencies)."""
    plan_batches: list[Any] | None = None
    """A fixed set of batches for DTME's offline analysis at iteration 0 (the paper's protocol:
    the plan is made before training and the modules are present from step 0); ``None``: DTME
    analyses the first training steps instead."""


@dataclass
class Problem:
    name: str
    description: str
    tasks: list[str]
    metrics: dict[str, bool]
    """Metric name → lower is better."""
    metric_task: dict[str, int]
    """Metric name → index of the task it measures (for single-task baselines)."""
    setup: Callable[[int, Any, bool], Instance]
    """``setup(seed, variant, quick)``."""
    steps: int
    quick_steps: int
    quick_methods: list[str]
    variants: list[Any] = field(default_factory=lambda: [None])
    quick_variants: list[Any] | None = None
    single_task_baselines: bool = True
    excluded: dict[str, str] = field(default_factory=dict)
    """Methods that do not apply, with the reason (e.g. log-losses on negative losses)."""
    method_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: str = ""
