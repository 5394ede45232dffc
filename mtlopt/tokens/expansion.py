"""Token modulation and token expansion modules, and the hooks that run blocks as task streams.

The blocks keep their type and their parameter names: the new parameters are registered as
sub-modules of the blocks they modify (``dtme_modulation``, ``dtme_tokens``), and forward hooks
reshape the block's input and output. A model expanded this way saves and loads with its own
``state_dict``; a fresh model must first be expanded by the same plan (DTME's ``load_state_dict``
does that) before it can load that state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .streams import STREAMS


class TokenModulation(nn.Module):
    """Per-task channel-wise affine ``W_i ⊙ t + b_i`` on every token (DTME, Sec. 3.3), initialised to
    the identity (W = 1, b = 0). One parameter per task, so each is reached by its task only."""

    def __init__(self, num_tasks: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.ParameterList(nn.Parameter(torch.ones(dim)) for _ in range(num_tasks))
        self.bias = nn.ParameterList(nn.Parameter(torch.zeros(dim)) for _ in range(num_tasks))

    def forward(self, x: Tensor) -> Tensor:
        k = len(self.weight)
        streams = x.view(k, -1, *x.shape[1:])
        weight = torch.stack(list(self.weight))[:, None, None, :]
        bias = torch.stack(list(self.bias))[:, None, None, :]
        return (streams * weight + bias).view_as(x)


class TaskTokens(nn.Module):
    """``n`` learnable tokens per task appended to that task's stream (DTME, Sec. 3.4), initialised
    from a normal truncated at ±2σ with σ = 0.02 (the ViT convention for learned tokens)."""

    def __init__(self, num_tasks: int, count: int, dim: int, std: float = 0.02) -> None:
        super().__init__()
        self.tokens = nn.ParameterList(
            nn.Parameter(
                nn.init.trunc_normal_(torch.empty(count, dim), std=std, a=-2 * std, b=2 * std)
            )
            for _ in range(num_tasks)
        )

    def forward(self, x: Tensor) -> Tensor:
        k = len(self.tokens)
        streams = x.view(k, -1, *x.shape[1:])
        batch = streams.shape[1]
        tokens = torch.stack(list(self.tokens))[:, None].expand(k, batch, -1, -1).to(x.dtype)
        return torch.cat([streams, tokens], dim=2).view(k * batch, -1, x.shape[-1])


@dataclass
class ExpansionPlan:
    """Which layers get token modulation (TM) and which get task tokens (TE)."""

    num_tasks: int
    modulation_layers: list[int]
    expansion_layers: list[int]
    tokens_per_task: int = 6

    @property
    def branch_layer(self) -> int | None:
        chosen = set(self.modulation_layers) | set(self.expansion_layers)
        return min(chosen) if chosen else None


@dataclass
class Expansion:
    """An applied plan: the new modules and the hook handles (``remove()`` undoes the hooks)."""

    plan: ExpansionPlan
    modules: dict[str, nn.Module] = field(default_factory=dict)
    handles: list = field(default_factory=list)

    def parameters(self) -> list[nn.Parameter]:
        return [p for module in self.modules.values() for p in module.parameters()]

    def task_parameters(self) -> list[list[nn.Parameter]]:
        """``[task][...]``: the parameters each task owns (its modulation and its tokens)."""
        owned: list[list[nn.Parameter]] = [[] for _ in range(self.plan.num_tasks)]
        for module in self.modules.values():
            lists = (
                [module.weight, module.bias]
                if isinstance(module, TokenModulation)
                else [module.tokens]
            )
            for plist in lists:
                for task, parameter in enumerate(plist):
                    owned[task].append(parameter)
        return owned

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def expand(blocks: Sequence[nn.Module], plan: ExpansionPlan, dim: int) -> Expansion:
    """Insert the plan's modules into ``blocks`` and make every block from the branch on run the
    K task streams."""
    expansion = Expansion(plan)
    branch = plan.branch_layer
    if branch is None:
        return expansion
    k = plan.num_tasks
    device = next((p.device for b in blocks for p in b.parameters()), torch.device("cpu"))
    for d, block in enumerate(blocks):
        if d < branch:
            continue
        modulation = tokens = None
        if d in plan.modulation_layers:
            modulation = TokenModulation(k, dim).to(device)
            block.add_module("dtme_modulation", modulation)
            expansion.modules[f"{d}.modulation"] = modulation
        if d in plan.expansion_layers and plan.tokens_per_task > 0:
            tokens = TaskTokens(k, plan.tokens_per_task, dim).to(device)
            block.add_module("dtme_tokens", tokens)
            expansion.modules[f"{d}.tokens"] = tokens
        hooks = _StreamHooks(k, d == branch, modulation, tokens)
        expansion.handles.append(block.register_forward_pre_hook(hooks.before, with_kwargs=True))
        expansion.handles.append(block.register_forward_hook(hooks.after, with_kwargs=True))
    if branch > 0:  # a new forward pass of these blocks: forget the previous pass's streams
        expansion.handles.append(blocks[0].register_forward_pre_hook(_reset_streams))
    return expansion


def _reset_streams(module: nn.Module, args: tuple) -> None:
    STREAMS.reset()


class _StreamHooks:
    def __init__(
        self,
        num_tasks: int,
        branches: bool,
        modulation: TokenModulation | None,
        tokens: TaskTokens | None,
    ) -> None:
        self.k, self.branches, self.modulation, self.tokens = (
            num_tasks,
            branches,
            modulation,
            tokens,
        )
        self.length = 0

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        from_kwargs = not args
        x = kwargs.get("src", kwargs.get("x")) if from_kwargs else args[0]
        if self.branches:
            STREAMS.start(self.k, x.shape[0])
            x = x.repeat(self.k, 1, 1)
        elif not STREAMS.branched or x.shape[0] != self.k * STREAMS.batch:
            raise RuntimeError(
                "a block after the DTME branch point received an input that is not the K task "
                "streams: run the blocks in order in one forward pass"
            )
        self.length = x.shape[1]
        if self.modulation is not None:
            x = self.modulation(x)
        if self.tokens is not None:
            x = self.tokens(x)
        extra = self.tokens.tokens[0].shape[0] if self.tokens is not None else 0
        rest = tuple(self._adapt(a, extra) for a in (args[1:] if args else ()))
        kwargs = {key: self._adapt(v, extra) for key, v in kwargs.items()}
        if from_kwargs:
            kwargs["src" if "src" in kwargs else "x"] = x
            return (), kwargs
        return (x, *rest), kwargs

    def _adapt(self, value: object, extra: int) -> object:
        """Repeat per-sample extras (e.g. key padding masks [B, N]) for the K streams and pad masks
        over the appended task tokens (task tokens are never masked)."""
        if not isinstance(value, Tensor):
            return value
        if value.dim() >= 1 and value.shape[0] == STREAMS.batch and self.k > 1:
            value = value.repeat(self.k, *([1] * (value.dim() - 1)))
        if extra and value.dim() == 2 and value.shape[-1] == self.length:
            pad = value.new_zeros(value.shape[0], extra)
            value = torch.cat([value, pad], dim=-1)
            if value.shape[0] == self.length:  # a square [N, N] attention mask
                value = torch.cat([value, value.new_zeros(extra, value.shape[1])], dim=0)
        return value

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
        if self.tokens is None:
            return output
        if isinstance(output, Tensor):
            return output[:, : self.length]
        if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
            return (output[0][:, : self.length], *output[1:])
        raise TypeError(
            f"{type(module).__name__} returned {type(output).__name__}; expected tokens"
        )
