"""Sparse training: update only a chosen subset of the shared parameters, with any gradient method."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..engine import columns_of
from ..registry import create, register
from .base import (
    STRATEGY_KEY,
    Combined,
    GradientStrategy,
    LossStrategy,
    Strategy,
    _noop,
    chain,
)


@register(
    "sparse_mtl",
    kind="structural",
    cost="the base strategy's",
    stateful=True,
    paper="Zhang et al., Proactive Gradient Conflict Mitigation in Multi-Task Learning: A Sparse "
    "Training Perspective, arXiv 2411.18615, 2024",
    conventions="mask chosen once, at the first step, per output neuron: the top density fraction "
    "of each row of a weight by |∇ Σ_t L_t| (gradient-based selection; our reading, no official "
    "code); density=0.5 (ours: the paper sweeps it); base='ew'; mask= gives a fixed mask instead",
)
class SparseMTL(GradientStrategy):
    """Sparse training (ST) for gradient-conflict mitigation (Zhang et al., 2024).

    Only a fixed subset of the shared parameters is trained, the rest keeps its initial value:
    the update is ``θ ← θ − η · opt(M ⊙ d)`` with ``d`` the combined direction of any gradient
    method (the ``base``) and ``M`` a binary mask over the shared parameters. The paper shows that
    training fewer parameters lowers the incidence of conflicting task gradients, and that ST
    combines with gradient manipulation (PCGrad, CAGrad, Nash-MTL, ...).

    **Mask selection.** No official code is public. We follow the gradient-based parameter
    selection the paper builds on: at the first step, every shared tensor of two or more
    dimensions keeps, in each row (one output neuron), the ``density`` fraction of its entries with
    the largest ``|∂(Σ_t L_t)/∂θ|`` (at least one per row); a one-dimensional tensor (bias, norm
    scale) keeps that fraction of its entries. The mask then stays fixed; it is saved in
    ``state_dict``. Parameters that become shared later are trained in full. Without the
    optimizer's layout (``aggregate(J)`` called directly) the top fraction is taken over all of
    ``J``'s columns.

    **Given mask.** ``mask={parameter: bool tensor of its shape}`` trains exactly the ``True``
    entries of the listed shared parameters (unlisted shared parameters are trained in full); the
    selection rule is then not used. Task-specific parameters (heads) are never masked.

    Args:
        base: the gradient strategy whose combined update is masked: a registered name (default
            ``"ew"``, the sum of the task gradients) or an instance.
        density: fraction of each row's entries that is trained (default 0.5).
        mask: a fixed mask ``{parameter: bool tensor}``; overrides the selection rule.
        num_tasks: number of tasks (optional).
        **base_kwargs: hyperparameters of ``base`` when it is given by name.
    """

    absent_tasks = "the base strategy's rule; the mask does not depend on the tasks present"
    supports_representation = False

    def __init__(
        self,
        base: str | Strategy = "ew",
        density: float = 0.5,
        mask: Mapping[Tensor, Tensor] | None = None,
        num_tasks: int | None = None,
        **base_kwargs: Any,
    ) -> None:
        super().__init__(num_tasks)
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must lie in (0, 1], got {density}")
        if isinstance(base, str):
            base = create(base, num_tasks=num_tasks, **base_kwargs)
        elif base_kwargs:
            raise TypeError("base keyword arguments are only accepted with a base name")
        if not isinstance(base, (GradientStrategy, LossStrategy)):
            raise TypeError(f"base must be a gradient strategy, got {type(base).__name__}")
        if isinstance(base, LossStrategy) and base.info.name != "ew":
            raise TypeError(
                f"base {base.info.name!r} is a loss strategy; sparse_mtl masks a combined "
                "gradient: use a gradient strategy or 'ew'"
            )
        self.base = base
        # The base's extra head gradients (ConsMTL) pass through: the mask is on shared columns.
        self.adds_head_gradients = getattr(base, "adds_head_gradients", False)  # type: ignore[misc]
        self.density = float(density)
        self._given = None if mask is None else {id(p): (p, m) for p, m in mask.items()}
        if self._given is not None:
            for p, m in self._given.values():
                if tuple(m.shape) != tuple(p.shape):
                    raise ValueError(
                        f"mask of shape {tuple(m.shape)} for a parameter of shape {tuple(p.shape)}"
                    )
        self.mask: Tensor | None = None
        self._layout: list[tuple[int, ...]] | None = None
        self._columns_key: tuple[int, ...] | None = None

    def hyperparameters(self) -> dict[str, object]:
        return {"base": self.base.info.name, "density": self.density}

    # The base strategy -------------------------------------------------------------------------
    def _build(self) -> None:
        assert self.num_tasks is not None
        self.base.build(self.num_tasks)

    def check_num_tasks(self, num_tasks: int) -> None:
        super().check_num_tasks(num_tasks)
        self.base.check_num_tasks(num_tasks)

    def parameters(self) -> list[torch.nn.Parameter]:
        return self.base.parameters()

    def transform_loss(self, index: int, loss: Tensor) -> Tensor:
        if isinstance(self.base, GradientStrategy):
            return self.base.transform_loss(index, loss)
        return loss

    @contextmanager
    def restricted_to(self, tasks: np.ndarray | None) -> Iterator[None]:
        with super().restricted_to(tasks), self.base.restricted_to(tasks):
            yield

    # Columns -----------------------------------------------------------------------------------
    def observe_columns(self, shared: list[Tensor], param_groups: list[dict]) -> None:
        if isinstance(self.base, GradientStrategy):
            self.base.observe_columns(shared, param_groups)
        key = tuple(map(id, shared))
        if key == self._columns_key:
            return
        self._columns_key = key
        self._layout = [
            tuple(p.shape) if not p.is_complex() else (columns_of(p),) for p in shared
        ]
        if self._given is not None:
            pieces = []
            for p in shared:
                entry = self._given.get(id(p))
                if entry is None:
                    pieces.append(torch.ones(columns_of(p), dtype=torch.bool))
                else:
                    flat = entry[1].detach().reshape(-1).to(torch.bool).cpu()
                    pieces.append(flat.repeat_interleave(2) if p.is_complex() else flat)
            self.mask = torch.cat(pieces) if pieces else torch.ones(0, dtype=torch.bool)

    def remap_columns(self, mapping: Tensor) -> None:
        if isinstance(self.base, GradientStrategy):
            self.base.remap_columns(mapping)
        if self.mask is not None and self._given is None:
            keep = mapping >= 0
            new = torch.ones(mapping.shape[0], dtype=torch.bool)
            new[keep] = self.mask[mapping[keep].cpu()]
            self.mask = new

    # Combination -------------------------------------------------------------------------------
    def combine(self, jacobian: Tensor, losses: Tensor | None = None) -> Combined:
        combined = self.base.combine(jacobian, losses)
        mask, commit_mask = self.mask, _noop
        if mask is None:
            if self._given is not None:
                raise RuntimeError(
                    "sparse_mtl with mask= needs the optimizer's parameter layout: use it inside "
                    "an MTLOptimizer"
                )
            mask = select_mask(jacobian.sum(dim=0).abs(), self._layout, self.density)

            def commit_mask() -> None:
                self.mask = mask

        if mask.shape[0] != jacobian.shape[1]:
            raise ValueError(
                f"sparse_mtl's mask covers {mask.shape[0]} shared entries, J has "
                f"{jacobian.shape[1]} columns"
            )
        direction = combined.direction * mask.to(combined.direction.device, torch.bool)
        return Combined(
            direction=direction,
            weights=combined.weights,
            commit=chain(combined.commit, commit_mask),
            gramian=combined.gramian,
            head_weights=combined.head_weights,
            head_extra=combined.head_extra,
        )

    # State -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        mask = None if self.mask is None else self.mask.clone()
        return {STRATEGY_KEY: self.info.name, "mask": mask, "base": self.base.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._refuse_other_strategy(state)
        if set(state) != {STRATEGY_KEY, "mask", "base"}:
            raise KeyError(f"sparse_mtl state needs mask and base, got {sorted(state)}")
        mask = state["mask"]
        if mask is not None and (not isinstance(mask, Tensor) or mask.dtype != torch.bool):
            raise TypeError("sparse_mtl's saved mask must be a bool tensor")
        before = self.base.state_dict()
        self.base.load_state_dict(state["base"])
        try:
            if self._given is None:
                self.mask = None if mask is None else mask.clone()
        except BaseException:
            self.base.load_state_dict(before)
            raise


def select_mask(
    scores: Tensor, layout: list[tuple[int, ...]] | None, density: float
) -> Tensor:
    """The entries to train: per row of each tensor of ``layout`` (its first axis: one output
    neuron), the ``density`` fraction (at least one) with the largest ``scores``; a 1-D tensor is
    one row. ``layout=None``: the top fraction of all entries."""
    scores = scores.detach().float().cpu()
    if layout is None:
        layout = [(scores.shape[0],)]
    if sum(math.prod(shape) for shape in layout) != scores.shape[0]:
        raise ValueError("the parameter layout does not match J's columns")
    pieces = []
    for piece, shape in zip(scores.split([math.prod(s) for s in layout]), layout, strict=True):
        rows = piece.reshape(shape[0], -1) if len(shape) >= 2 else piece.reshape(1, -1)
        if rows.numel() == 0:
            pieces.append(torch.zeros(0, dtype=torch.bool))
            continue
        keep = max(1, math.ceil(density * rows.shape[1]))
        top = rows.topk(keep, dim=1).indices
        chosen = torch.zeros_like(rows, dtype=torch.bool).scatter_(1, top, True)
        pieces.append(chosen.reshape(-1))
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.bool)
