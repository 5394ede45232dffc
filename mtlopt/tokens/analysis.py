"""Token-space conflict analysis on any transformer, without changing it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
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
        num_tasks: int | None = None,
        r: float = 100.0,
        split_rule: SplitRule = "ratio",
        eps: float = 0.0,
        mask_conventions: dict[str, bool] | None = None,
    ) -> None:
        self.blocks = find_blocks(blocks)
        self.r, self.split_rule, self.eps = r, split_rule, eps
        self.taps = TokenTaps(self.blocks, mask_conventions)
        self.covariance = CovarianceAccumulator(len(self.blocks))
        self.spaces: list[TokenSpace] | None = None
        self.num_tasks: int | None = None
        self.counts: ConflictCounts | None = None
        self.dims: list[int] = []
        if num_tasks is not None:
            self.set_num_tasks(num_tasks)

    def set_num_tasks(self, num_tasks: int) -> None:
        """Fix K (at the first losses when it was not given)."""
        if self.num_tasks is not None and self.num_tasks != num_tasks:
            raise ValueError(f"expected {self.num_tasks} task losses, got {num_tasks}")
        if self.counts is None:
            self.num_tasks = num_tasks
            self.counts = ConflictCounts(len(self.blocks), num_tasks)

    # Each observation is computed first (``stage_*``) and added by ``commit``, so that a caller can
    # drop a batch whose training step fails.
    def stage_tokens(self) -> tuple[str, Any]:
        tokens = self.taps.batch_first(self.taps.captured())
        real = list(self.taps.real)
        dims = [x.shape[-1] for x in tokens]
        if self.dims and dims != self.dims:
            raise ValueError(f"block widths changed from {self.dims} to {dims}")
        increments = self.covariance.increments(tokens, real)
        self.taps.clear()
        return "tokens", (increments, tokens[0].shape[0], dims)

    def stage_gradients(
        self, losses: Sequence[Tensor], retain_graph: bool = True
    ) -> tuple[str, Any]:
        if self.spaces is None:
            raise RuntimeError("fit_spaces() must run before observe_gradients()")
        self.set_num_tasks(len(losses))
        assert self.counts is not None
        tokens = self.taps.captured()
        real = list(self.taps.real)
        grads = [
            self.taps.batch_first(g)
            for g in token_gradients(losses, tokens, retain_graph=retain_graph)
        ]
        increments = self.counts.increments(self.spaces, grads, self.eps, real)
        self.taps.clear()
        return "gradients", increments

    def commit(self, staged: tuple[str, Any]) -> None:
        kind, value = staged
        if kind == "tokens":
            increments, samples, dims = value
            self.covariance.add_increments(increments, samples)
            self.dims = dims
        else:
            assert self.counts is not None
            self.counts.add_increments(value)

    def observe_tokens(self) -> None:
        self.commit(self.stage_tokens())

    def fit_spaces(self) -> list[TokenSpace]:
        self.spaces = [
            TokenSpace.from_covariance(self.covariance.covariance(d), self.r, self.split_rule)
            for d in range(len(self.blocks))
        ]
        return self.spaces

    def observe_gradients(self, losses: Sequence[Tensor], retain_graph: bool = True) -> None:
        if self.num_tasks is not None and len(losses) != self.num_tasks:
            raise ValueError(f"expected {self.num_tasks} task losses, got {len(losses)}")
        self.commit(self.stage_gradients(losses, retain_graph))

    def report(self) -> ConflictReport:
        if self.spaces is None:
            raise RuntimeError("no token space yet: observe tokens and call fit_spaces() first")
        if self.counts is None:
            raise RuntimeError("no token gradients were observed: conflict rates are undefined")
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

    # State (tensors and Python primitives only), so that an analysis interrupted by a restart
    # resumes exactly and ``torch.load(path)`` (weights_only) reads it.
    def state_dict(self) -> dict[str, Any]:
        counts = self.counts
        return {
            "sums": [None if s is None else s.clone() for s in self.covariance.sums],
            "samples": int(self.covariance.samples),
            "dims": [int(d) for d in self.dims],
            "num_tasks": self.num_tasks,
            "counts": None
            if counts is None
            else {
                name: torch.from_numpy(np.array(getattr(counts, name)))
                for name in (*_COUNT_NAMES, "tokens")
            },
            "fitted": self.spaces is not None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Validates everything, then loads; on an error nothing has changed."""
        depth = len(self.blocks)
        missing = {"sums", "samples", "dims", "num_tasks", "counts", "fitted"} - set(state)
        if missing:
            raise KeyError(f"DTME analysis state is missing {sorted(missing)}")
        if len(state["sums"]) != depth:
            raise ValueError(
                f"the checkpoint's analysis covers {len(state['sums'])} blocks, this model has {depth}"
            )
        k = state["num_tasks"]
        if self.num_tasks is not None and k is not None and k != self.num_tasks:
            raise ValueError(f"the checkpoint's analysis has {k} tasks, this DTME {self.num_tasks}")
        counts = None
        if state["counts"] is not None:
            counts = ConflictCounts(depth, k)
            for name, value in state["counts"].items():
                array = np.asarray(value.numpy() if isinstance(value, Tensor) else value, float)
                if array.shape != getattr(counts, name).shape:
                    raise ValueError(f"analysis state {name!r} has shape {array.shape}")
                setattr(counts, name, array.copy())
        covariance = CovarianceAccumulator(depth)
        covariance.sums = [None if s is None else s.clone() for s in state["sums"]]
        covariance.samples = int(state["samples"])
        spaces = None
        if state["fitted"]:
            spaces = [
                TokenSpace.from_covariance(
                    (covariance.sums[d] / covariance.samples).numpy(), self.r, self.split_rule
                )
                for d in range(depth)
            ]
        self.covariance, self.dims, self.spaces = covariance, list(state["dims"]), spaces
        if counts is not None:
            self.num_tasks, self.counts = k, counts
        elif k is not None:
            self.num_tasks, self.counts = None, None
            self.set_num_tasks(k)


_COUNT_NAMES = ("range_conflicts", "null_conflicts", "range_pairs", "null_pairs")


def analyze_token_conflicts(
    blocks: nn.Module | Sequence[nn.Module],
    batches: Iterable[Any],
    task_losses: Callable[[Any], Sequence[Tensor] | Mapping[str, Tensor]],
    num_tasks: int | None = None,
    r: float = 100.0,
    split_rule: SplitRule = "ratio",
) -> ConflictReport:
    """The paper's two passes over ``batches`` (a re-iterable, e.g. a list or a DataLoader):
    covariance first (no gradients), then token-gradient conflicts. ``task_losses(batch)`` runs the
    model's forward pass and returns the task losses (a sequence, or a dict whose values are
    taken in its order). The model is left unchanged.
    """
    analysis = TokenSpaceAnalysis(blocks, num_tasks, r, split_rule)
    try:
        with torch.no_grad():
            for batch in batches:
                task_losses(batch)
                analysis.observe_tokens()
        analysis.fit_spaces()
        for batch in batches:
            losses = task_losses(batch)
            values = list(losses.values()) if isinstance(losses, Mapping) else list(losses)
            analysis.observe_gradients(values, retain_graph=False)
        return analysis.report()
    finally:
        analysis.close()
