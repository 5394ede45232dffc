"""Per-group aggregation: any gradient strategy applied separately to column blocks of J."""

from __future__ import annotations

import copy
import zlib
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..partition import columns_of
from ._wrapping import Wrapping, wrapped_strategy
from .base import STRATEGY_KEY, Combined, GradientStrategy, Randomized, Strategy, chain

GroupBy = Literal["param_group", "module", "tensor"]
GROUP_BY = ("param_group", "module", "tensor")


class Grouped(Wrapping):
    """A gradient strategy applied to each group of shared parameters on its own.

    The columns of ``J`` are split into blocks, one per parameter group of the wrapped optimizer
    (``"param_group"``), per module (``"module"``: the parameters a module registers itself, as
    GradVac's "all_layer" and LibMTL's per-layer modes) or per parameter tensor (``"tensor"``,
    GradVac's "all_matrix"); each block gets its own copy of the strategy, with its own state
    (a randomized strategy's copy is reseeded from its seed and the group's name), and the
    combined update is the concatenation of the blocks' updates. Created by
    ``mtlopt.create(name, group_by=...)`` (or ``MTLOptimizer(opt, name, group_by=...)``);
    ``"module"`` needs the model (``modules=model``) to know which module owns which parameter.

    Until the optimizer has told the layout of ``J`` (a standalone :meth:`aggregate`), ``J`` is one
    block. Task weights differ between blocks, so none are reported (diagnostics show none).
    Groups are named by the parameter group's index, the module's name or the parameter's name
    (its index in the optimizer without a model), so a checkpoint restores each block's state into
    the same group; a block whose parameters change keeps its state, each parameter's columns
    following it (strategies with per-column state).
    """

    absent_tasks = "each block applies the wrapped strategy's rule to the present rows"

    def __init__(
        self,
        base: str | Strategy,
        group_by: GroupBy,
        modules: nn.Module | None = None,
        base_kwargs: dict[str, Any] | None = None,
        num_tasks: int | None = None,
    ):
        if group_by not in GROUP_BY:
            raise ValueError(f"group_by must be one of {', '.join(map(repr, GROUP_BY))}, got {group_by!r}")
        if group_by == "module" and modules is None:
            raise ValueError(
                "group_by='module' needs the model to tell which module owns which parameter: "
                "pass modules=model"
            )
        super().__init__(num_tasks)
        self.template = wrapped_strategy(base, num_tasks, base_kwargs)
        if type(self.template).transform_loss is not GradientStrategy.transform_loss:
            raise ValueError(
                f"group_by does not apply to {self.template.info.name}: it transforms each task's "
                "loss before differentiation, one transform for the whole model"
            )
        self.group_by, self.modules = group_by, modules
        self.info = replace(  # type: ignore[misc]
            self.template.info, conventions=f"{self.template.info.conventions}; group_by={group_by}"
        )
        self.supports_representation = False  # type: ignore[misc]  # blocks are parameter columns
        self.blocks: dict[str, GradientStrategy] = {}
        self._layout: list[tuple[str, list[tuple[int, int]]]] | None = None
        """Per group, its name and its parameters' (id, columns), in column order."""
        self._columns: dict[str, Tensor] = {}
        self._layout_key: tuple[int, ...] | None = None

    def inner(self) -> list[GradientStrategy]:
        return [self.template, *self.blocks.values()]

    def hyperparameters(self) -> dict[str, object]:
        return {"base": self.template, "group_by": self.group_by}

    def _block(self, name: str) -> GradientStrategy:
        """The block's strategy, created (a fresh copy of the template) the first time the group
        appears; called outside of any absent-task restriction."""
        if name not in self.blocks:
            block = copy.deepcopy(self.template)
            if isinstance(block, Randomized):
                # Each group draws its own numbers: a seed from the template's state and the name.
                state = int(block._rng_state["state"]["state"])
                block._init_rng((state ^ zlib.crc32(name.encode())) % 2**62)
            self.blocks[name] = block
        return self.blocks[name]

    # The layout of J ----------------------------------------------------------------------------
    def observe_columns(self, shared: Sequence[Tensor], param_groups: Sequence[dict]) -> None:
        key = tuple(id(p) for p in shared)
        if key == self._layout_key:
            return
        names = self._names(param_groups)
        groups: dict[str, list[tuple[int, int]]] = {}
        columns: dict[str, list[int]] = {}
        start = 0
        for p in shared:
            count = columns_of(p)
            group = names.get(id(p), "other")
            groups.setdefault(group, []).append((id(p), count))
            columns.setdefault(group, []).extend(range(start, start + count))
            start += count
        old = dict(self._layout or [])
        for group in groups:
            self._block(group)
        for group, members in groups.items():
            if group in old and old[group] != members and group in self.blocks:
                self.blocks[group].remap_columns(_within(old[group], members))
        self._layout = list(groups.items())
        self._columns = {g: torch.tensor(c, dtype=torch.long) for g, c in columns.items()}
        self._layout_key = key

    def _names(self, param_groups: Sequence[dict]) -> dict[int, str]:
        if self.group_by == "param_group":
            return {id(p): f"group{g}" for g, group in enumerate(param_groups) for p in group["params"]}
        if self.modules is not None:
            if self.group_by == "tensor":
                return {id(p): name for name, p in self.modules.named_parameters()}
            return {
                id(p): module_name or "(root)"
                for module_name, module in self.modules.named_modules()
                for p in module.parameters(recurse=False)
            }
        flat = [p for group in param_groups for p in group["params"]]
        return {id(p): f"param{k}" for k, p in enumerate(flat)}

    def remap_columns(self, mapping: Tensor) -> None:
        """Each block follows its own parameters in :meth:`observe_columns`."""

    # Combining -----------------------------------------------------------------------------------
    def combine(self, jacobian: Tensor, losses: Tensor | None = None) -> Combined:
        if self._layout is None:
            if "all" not in self.blocks and self._present is not None:
                raise RuntimeError("the layout of J must be observed before a restricted step")
            whole = self._block("all").combine(jacobian, losses)
            return Combined(direction=whole.direction, weights=None, commit=whole.commit)
        direction = torch.empty(jacobian.shape[1], dtype=jacobian.dtype, device=jacobian.device)
        commits = []
        for group, _ in self._layout:
            index = self._columns[group].to(jacobian.device)
            part = self.blocks[group].combine(jacobian.index_select(1, index), losses)
            direction[index] = part.direction
            commits.append(part.commit)
        return Combined(direction=direction, weights=None, commit=chain(*commits))

    # State ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            STRATEGY_KEY: self.info.name,
            "group_by": self.group_by,
            "blocks": {name: block.state_dict() for name, block in self.blocks.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved_by = state.get(STRATEGY_KEY) if isinstance(state, dict) else None
        if saved_by != self.info.name or state.get("group_by") != self.group_by:
            raise ValueError(
                f"this state was saved by {saved_by!r} grouped by {state.get('group_by')!r}, not "
                f"{self.info.name!r} grouped by {self.group_by!r}"
            )
        fresh = {name: copy.deepcopy(self.template) for name in state["blocks"]}
        for name, block in fresh.items():
            block.load_state_dict(state["blocks"][name])  # raises before anything is replaced
        self.blocks = fresh


def _within(old: list[tuple[int, int]], new: list[tuple[int, int]]) -> Tensor:
    """For each column of a block's new layout, its column in the old one (−1: new parameter)."""
    offsets, start = {}, 0
    for pid, count in old:
        offsets[pid] = (start, count)
        start += count
    pieces = []
    for pid, count in new:
        span = offsets.get(pid)
        if span is None or span[1] != count:
            pieces.append(torch.full((count,), -1, dtype=torch.long))
        else:
            pieces.append(torch.arange(span[0], span[0] + count))
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
