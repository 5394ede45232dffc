"""Token-space conflict analysis on any transformer, without changing it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .report import ConflictReport
from .space import ConflictCounts, CovarianceAccumulator, SplitRule, TokenSpace
from .taps import TokenTaps, find_blocks, token_gradients


class TokenSpaceAnalysis:
    """Accumulates the statistics of DTME's analysis (Jeong & Yoon, 2025, Alg. 1 and App. B.3).

    Phase 1, :meth:`observe_tokens` after forward passes: the uncentered token covariance of every
    block input. :meth:`fit_spaces` eigendecomposes it (float64) and splits range and null space with
    ratio ``r``. Phase 2, :meth:`observe_gradients` with the task losses of a forward pass: every
    task's gradient with respect to every block input (one backward pass per task) is projected on
    both spaces and the conflicting (sample, token, pair) triples are counted. :meth:`report` returns
    the rates as plain data.
    """

    def __init__(
        self,
        blocks: nn.Module | Sequence[nn.Module],
        num_tasks: int,
        r: float = 100.0,
        split_rule: SplitRule = "ratio",
        eps: float = 0.0,
    ) -> None:
        self.blocks = find_blocks(blocks)
        self.num_tasks, self.r, self.split_rule, self.eps = num_tasks, r, split_rule, eps
        self.taps = TokenTaps(self.blocks)
        self.covariance = CovarianceAccumulator(len(self.blocks))
        self.spaces: list[TokenSpace] | None = None
        self.counts = ConflictCounts(len(self.blocks), num_tasks)
        self.dims: list[int] = []

    def observe_tokens(self) -> None:
        tokens = self.taps.captured()
        self.dims = [x.shape[-1] for x in tokens]
        self.covariance.add(tokens)
        self.taps.clear()

    def fit_spaces(self) -> list[TokenSpace]:
        self.spaces = [
            TokenSpace.from_covariance(self.covariance.covariance(d), self.r, self.split_rule)
            for d in range(len(self.blocks))
        ]
        return self.spaces

    def observe_gradients(self, losses: Sequence[Tensor], retain_graph: bool = True) -> None:
        if self.spaces is None:
            raise RuntimeError("fit_spaces() must run before observe_gradients()")
        if len(losses) != self.num_tasks:
            raise ValueError(f"expected {self.num_tasks} task losses, got {len(losses)}")
        tokens = self.taps.captured()
        grads = token_gradients(losses, tokens, retain_graph=retain_graph)
        self.counts.add(self.spaces, grads, self.eps)
        self.taps.clear()

    def report(self) -> ConflictReport:
        if self.spaces is None:
            raise RuntimeError("no token space yet: observe tokens and call fit_spaces() first")
        range_rates, null_rates = self.counts.rates()
        pair_range, pair_null = self.counts.pair_rates()
        return ConflictReport(
            range_rates=[float(v) for v in range_rates],
            null_rates=[float(v) for v in null_rates],
            range_ranks=[s.rank for s in self.spaces],
            dims=[int(s.basis.shape[0]) for s in self.spaces],
            tokens_seen=[float(v) for v in self.counts.tokens],
            pair_range_rates=pair_range.tolist(),
            pair_null_rates=pair_null.tolist(),
        )

    def close(self) -> None:
        self.taps.remove()

    # State, so that an analysis interrupted by a restart resumes exactly.
    def state_dict(self) -> dict[str, Any]:
        return {
            "sums": [None if s is None else s.clone() for s in self.covariance.sums],
            "samples": self.covariance.samples,
            "dims": list(self.dims),
            "range_conflicts": self.counts.range_conflicts.copy(),
            "null_conflicts": self.counts.null_conflicts.copy(),
            "tokens": self.counts.tokens.copy(),
            "fitted": self.spaces is not None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.covariance.sums = [None if s is None else s.clone() for s in state["sums"]]
        self.covariance.samples = state["samples"]
        self.dims = list(state["dims"])
        self.counts.range_conflicts = np.array(state["range_conflicts"])
        self.counts.null_conflicts = np.array(state["null_conflicts"])
        self.counts.tokens = np.array(state["tokens"])
        self.spaces = None
        if state["fitted"]:
            self.fit_spaces()


def analyze_token_conflicts(
    blocks: nn.Module | Sequence[nn.Module],
    batches: Iterable[Any],
    task_losses: Callable[[Any], Sequence[Tensor]],
    num_tasks: int,
    r: float = 100.0,
    split_rule: SplitRule = "ratio",
) -> ConflictReport:
    """The paper's two passes over ``batches`` (a re-iterable, e.g. a list or a DataLoader):
    covariance first (no gradients), then token-gradient conflicts. ``task_losses(batch)`` runs the
    model's forward pass and returns the task losses. The model is left unchanged.
    """
    analysis = TokenSpaceAnalysis(blocks, num_tasks, r, split_rule)
    try:
        with torch.no_grad():
            for batch in batches:
                task_losses(batch)
                analysis.observe_tokens()
        analysis.fit_spaces()
        for batch in batches:
            analysis.observe_gradients(list(task_losses(batch)), retain_graph=False)
        return analysis.report()
    finally:
        analysis.close()
