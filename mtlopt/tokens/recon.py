"""Recon: score shared layers by how often task gradients conflict in them, then make the worst
layers task-specific."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..registry import create, register
from ..strategies.base import GradientStrategy, LossStrategy, TokenStrategy
from .branching import branch_layers, task_copies
from .streams import STREAMS


@register(
    "recon",
    kind="structural",
    hooks=("layers",),
    cost="T backward (analysis), then T streams after the branch",
    stateful=True,
    paper="Shi et al., Recon: Reducing Conflicting Gradients from the Root for Multi-Task "
    "Learning, ICLR 2023",
    conventions="S = −0.02 and the count over steps and task pairs (official NYUv2 scripts); "
    "top_k=1 layer and analysis_steps=100 (ours: the paper branches 15 MTAN layers after 40 "
    "epochs); surgery during training, the copies start from the current weights (the paper "
    "retrains the branched network); base='ew'",
)
class Recon(TokenStrategy):
    """Recon (Shi, Ren, Yang, Zhang & Huang, ICLR 2023, Alg. 1).

    **Analysis.** For ``analysis_steps`` training steps (after ``warmup_steps``), every candidate
    layer ``l`` of ``layers`` gets a conflict score::

        s_l = Σ_steps Σ_{i<j} 1[ cos(g_i^l, g_j^l) < S ]

    with ``g_i^l`` task i's gradient of the layer's parameters (T extra backward passes per
    analysis step; a pair with a zero gradient is not counted).

    **Surgery.** The ``top_k`` layers with the highest score (ties: the earlier layer) become
    task-specific: each gets one copy per task, initialised from its current weights (task 0 keeps
    the original parameters, the others get deep copies that join the wrapped optimizer with the
    hyperparameters of the original's group). From the first branched layer on the network runs
    K task streams, as after a DTME expansion: the heads must read their features with
    :func:`mtlopt.task_view` (an error says so otherwise). Each copy is then reached by its own
    task only and receives that task's gradient; ``base`` combines the task losses throughout.
    The official code retrains the branched network from scratch; here training goes on (retrain
    a fresh model with the same plan to follow the paper: ``load_state_dict`` re-applies it).

    Restoring: create the fresh model, optimizer and Recon, ``opt.load_state_dict(saved)`` (which
    re-applies the surgery), then ``model.load_state_dict(saved_model)``.

    Args:
        layers: the candidate layers in forward order (a list of modules), or a module whose
            sub-modules that hold parameters themselves are the candidates.
        base: the strategy that combines the task losses (default ``"ew"``), or an instance.
        base_kwargs: its hyperparameters.
        threshold: S, the cosine below which a pair conflicts (default −0.02).
        top_k: how many layers to branch (default 1).
        analysis_steps: steps the scores are counted over (default 100).
        warmup_steps: ordinary steps before the analysis (default 0).
        num_tasks: number of tasks (default: the first step's).
    """

    absent_tasks = "not supported: every task needs a loss in every step (an error says so)"

    def __init__(
        self,
        layers: nn.Module | Sequence[nn.Module] | None = None,
        base: str | LossStrategy | GradientStrategy = "ew",
        base_kwargs: dict[str, Any] | None = None,
        threshold: float = -0.02,
        top_k: int = 1,
        analysis_steps: int = 100,
        warmup_steps: int = 0,
        num_tasks: int | None = None,
    ) -> None:
        super().__init__(num_tasks)
        if top_k < 1 or analysis_steps < 1 or warmup_steps < 0:
            raise ValueError("top_k and analysis_steps must be positive, warmup_steps >= 0")
        self.layers, self._layer_params = candidate_layers(layers)
        if self.layers is not None and top_k > len(self.layers):
            raise ValueError(f"top_k={top_k} but there are {len(self.layers)} candidate layers")
        self.base: LossStrategy | GradientStrategy = (
            create(base, num_tasks=num_tasks, **(base_kwargs or {}))
            if isinstance(base, str)
            else base
        )
        if not isinstance(self.base, (LossStrategy, GradientStrategy)):
            raise TypeError("the base of recon must be a loss or gradient strategy")
        self.threshold, self.top_k = float(threshold), int(top_k)
        self.analysis_steps, self.warmup_steps = int(analysis_steps), int(warmup_steps)
        self.steps = 0
        self.scores: np.ndarray | None = None
        self.chosen: list[int] | None = None
        self._pending: list[np.ndarray] = []
        self._handles: list[Any] = []
        self._optimizer: torch.optim.Optimizer | None = None

    def hyperparameters(self) -> dict[str, object]:
        return {
            "base": self.base.info.name,
            "threshold": self.threshold,
            "top_k": self.top_k,
            "analysis_steps": self.analysis_steps,
        }

    def _build(self) -> None:
        assert self.num_tasks is not None
        self.base.build(self.num_tasks)

    def parameters(self) -> list[nn.Parameter]:
        return self.base.parameters()

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        self._optimizer = optimizer

    def task_parameters(self) -> list[list[nn.Parameter]]:
        if self.chosen is None or self.layers is None or self.num_tasks is None:
            return []
        return task_copies(self.layers, self.chosen, self.num_tasks)

    # Analysis ---------------------------------------------------------------------------------
    def observe(self, losses: list[Tensor]) -> None:
        if self.layers is None:
            raise TypeError(
                "recon needs its candidate layers: MTLOptimizer(opt, 'recon', layers=model.trunk) "
                "(a module whose parameterised sub-modules are the candidates, or a list of them); "
                "nothing was changed"
            )
        if self.chosen is not None:
            if STREAMS.branched and STREAMS.views == 0:
                raise RuntimeError(
                    "after Recon's surgery the layers from the first branched one run K task "
                    "streams: the heads must read their features with mtlopt.task_view(z, task)"
                )
            return
        if self.steps < self.warmup_steps:
            return
        window = getattr(self._optimizer, "_window", None)
        if window is None or getattr(window, "info", None) is None:
            self._pending = []  # the first backward of a step
        self._pending.append(conflict_counts(losses, self._layer_params, self.threshold))

    def after_step(self) -> None:
        if self.chosen is not None:
            return
        if self.steps >= self.warmup_steps and self._pending:
            counts = np.sum(self._pending, axis=0)
            self.scores = counts if self.scores is None else self.scores + counts
        self._pending = []
        self.steps += 1
        if self.steps == self.warmup_steps + self.analysis_steps:
            assert self.scores is not None
            self.chosen = top_layers(self.scores, self.top_k)
            self._apply()

    def _apply(self) -> None:
        assert self.layers is not None and self.chosen is not None and self.num_tasks is not None
        if self.num_tasks < 2:
            return
        homes = [{id(p) for p in self.layers[i].parameters()} for i in self.chosen]
        self._handles = branch_layers(self.layers, self.chosen, self.num_tasks)
        if self._optimizer is None:
            return
        groups = self._optimizer.param_groups
        for index, home_ids in zip(self.chosen, homes, strict=True):
            home = next((g for g in groups if any(id(p) in home_ids for p in g["params"])), None)
            hyper = {} if home is None else {k: v for k, v in home.items() if k != "params"}
            copies = list(self.layers[index].recon_copies.parameters())
            if copies:
                self._optimizer.add_param_group({**hyper, "params": copies})

    # State ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "strategy": "recon",
            "num_tasks": self.num_tasks,
            "steps": self.steps,
            "scores": None if self.scores is None else torch.from_numpy(self.scores.copy()),
            "chosen": None if self.chosen is None else list(self.chosen),
            "base": self.base.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Validates first; re-applies the saved surgery (on a fresh model)."""
        if not isinstance(state, Mapping) or state.get("strategy") != "recon":
            raise ValueError("not a Recon checkpoint; load a checkpoint saved by recon")
        missing = {"num_tasks", "steps", "scores", "chosen", "base"} - set(state)
        if missing:
            raise KeyError(f"Recon state is missing {sorted(missing)}")
        k = state["num_tasks"]
        if self.num_tasks is not None and k is not None and k != self.num_tasks:
            raise ValueError(f"the checkpoint is of {k} tasks; this Recon has {self.num_tasks}")
        chosen = state["chosen"]
        if chosen is not None:
            if self.chosen is not None:
                raise RuntimeError("this Recon has already branched its layers; use a fresh one")
            if self.layers is None or any(not 0 <= i < len(self.layers) for i in chosen):
                raise ValueError("the checkpoint's branched layers do not match these layers")
        copy.deepcopy(self.base).load_state_dict(state["base"])  # raises before any change
        self.base.load_state_dict(state["base"])
        self.num_tasks = k if k is not None else self.num_tasks
        self.steps = int(state["steps"])
        scores = state["scores"]
        self.scores = None if scores is None else scores.detach().cpu().numpy().copy()
        self._pending = []
        if chosen is not None:
            self.chosen = [int(i) for i in chosen]
            self._apply()


def candidate_layers(
    layers: nn.Module | Sequence[nn.Module] | None,
) -> tuple[list[nn.Module] | None, list[list[nn.Parameter]]]:
    """The candidate layers and the parameters scored for each: a list as given (each layer with
    all its parameters), or a module's sub-modules that hold parameters of their own (``Linear``,
    ``Conv2d``, norms; those parameters), in registration order."""
    if layers is None:
        return None, []
    if isinstance(layers, nn.Module) and not isinstance(layers, nn.ModuleList):
        found = [m for m in layers.modules() if any(True for _ in m.parameters(recurse=False))]
        params = [list(m.parameters(recurse=False)) for m in found]
    else:
        found = list(layers)
        params = [list(m.parameters()) for m in found]
    if not found:
        raise ValueError("recon found no candidate layer with parameters")
    return found, params


def conflict_counts(
    losses: Sequence[Tensor], layer_params: Sequence[Sequence[Tensor]], threshold: float
) -> np.ndarray:
    """Per layer, the number of task pairs ``i < j`` whose gradients of the layer's parameters have
    a cosine below ``threshold`` (pairs with a zero gradient are not counted)."""
    params = [[p for p in group if p.requires_grad] for group in layer_params]
    flat = [p for group in params for p in group]
    sizes = [sum(p.numel() for p in group) for group in params]
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, flat, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat([
                (torch.zeros_like(p) if g is None else g).reshape(-1).double()
                for p, g in zip(flat, grads, strict=True)
            ])
        )
    jacobian = torch.stack(rows)
    t = jacobian.shape[0]
    upper = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
    counts = np.zeros(len(params))
    for index, block in enumerate(jacobian.split(sizes, dim=1)):
        gramian = block @ block.T
        norms = gramian.diagonal().clamp_min(0).sqrt()
        denominator = torch.outer(norms, norms)
        valid = upper & (denominator > 0)
        cosines = gramian / torch.where(denominator > 0, denominator, torch.ones(()))
        counts[index] = float((valid & (cosines < threshold)).sum())
    return counts


def top_layers(scores: np.ndarray, k: int) -> list[int]:
    """The ``k`` layers with the highest score (ties: the earlier layer), in forward order."""
    order = np.argsort(-scores, kind="stable")
    return sorted(int(i) for i in order[:k])
