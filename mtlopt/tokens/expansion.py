"""Token modulation and token expansion modules, and the hooks that run blocks as task streams.

The blocks keep their type and their parameter names: the new parameters are registered as
sub-modules of the blocks they modify (``dtme_modulation``, ``dtme_tokens``), and forward hooks
reshape the block's input and output. A model expanded this way saves and loads with its own
``state_dict``; a fresh model must first be expanded by the same plan (DTME's ``load_state_dict``
or :func:`mtlopt.tokens.load_expanded` does that) before it can load that state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .extras import adapt, argument_names
from .stream_calls import begin_record, install
from .streams import STREAMS
from .taps import batch_axis


class TokenModulation(nn.Module):
    """Per-task channel-wise affine ``W_i ⊙ t + b_i`` on every token (DTME, Sec. 3.3, Eq. 6),
    initialised to the identity (W = 1, b = 0). One parameter per task, so each is reached by its
    task only."""

    def __init__(
        self, num_tasks: int, dim: int, dtype: torch.dtype | None = None, device: Any = None
    ) -> None:
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.weight = nn.ParameterList(
            nn.Parameter(torch.ones(dim, **kw)) for _ in range(num_tasks)
        )
        self.bias = nn.ParameterList(nn.Parameter(torch.zeros(dim, **kw)) for _ in range(num_tasks))

    def forward(self, x: Tensor, task: int | None = None) -> Tensor:
        if task is not None:
            return x * self.weight[task] + self.bias[task]
        k = len(self.weight)
        streams = x.view(k, -1, *x.shape[1:])
        weight = torch.stack(list(self.weight))[:, None, None, :]
        bias = torch.stack(list(self.bias))[:, None, None, :]
        return (streams * weight + bias).view_as(x)


class TaskTokens(nn.Module):
    """``n`` learnable tokens per task appended to that task's stream (DTME, Sec. 3.4, Eq. 7),
    initialised from a normal truncated at ±2σ with σ = 0.02 (the ViT convention for learned
    tokens), drawn from ``generator`` (so that a restored run draws the same tokens)."""

    def __init__(
        self,
        num_tasks: int,
        count: int,
        dim: int,
        std: float = 0.02,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: Any = None,
    ) -> None:
        super().__init__()
        values = [
            nn.init.trunc_normal_(
                torch.empty(count, dim), std=std, a=-2 * std, b=2 * std, generator=generator
            )
            for _ in range(num_tasks)
        ]
        self.tokens = nn.ParameterList(
            nn.Parameter(v.to(dtype=dtype, device=device)) for v in values
        )

    def forward(self, x: Tensor, task: int | None = None) -> Tensor:
        if task is not None:
            tokens = self.tokens[task][None].expand(x.shape[0], -1, -1).to(x.dtype)
            return torch.cat([x, tokens], dim=1)
        k = len(self.tokens)
        streams = x.view(k, -1, *x.shape[1:])
        batch = streams.shape[1]
        tokens = torch.stack(list(self.tokens))[:, None].expand(k, batch, -1, -1).to(x.dtype)
        return torch.cat([streams, tokens], dim=2).view(k * batch, -1, x.shape[-1])


class TokenGate(nn.Module):
    """One learnable scalar per task that blends an expanded block's output between the block
    without task tokens (gate 0) and with them (gate 1): ``y = f(x) + g_i · (f([x; T_i])[:N] − f(x))``
    on stream i. Initialised closed (g = 0), so the expanded model computes exactly, bit for bit,
    what the model before the expansion computed (``0 · d = 0`` and ``f(x) + 0 = f(x)``); the gate
    receives a gradient at once and the tokens from the step after it opens (the zero-initialised
    factor of LoRA and ReZero). Costs one more pass of the block (without its task tokens)."""

    def __init__(
        self, num_tasks: int, dtype: torch.dtype | None = None, device: Any = None
    ) -> None:
        super().__init__()
        self.gate = nn.ParameterList(
            nn.Parameter(torch.zeros((), dtype=dtype, device=device)) for _ in range(num_tasks)
        )

    def values(self, task: int | None = None) -> Tensor:
        """``[S]``: the gate of each stream run (all K, or ``task``'s alone)."""
        if task is not None:
            return self.gate[task].reshape(1)
        return torch.stack(list(self.gate))


@dataclass
class ExpansionPlan:
    """Which layers get token modulation (TM) and which get task tokens (TE), and what the plan is
    predicted to cost (:mod:`mtlopt.tokens.budget`). ``gated``: the task tokens' contribution
    passes through a :class:`TokenGate` initialised closed (function-preserving expansion);
    ``False`` is the paper's ungated task tokens."""

    num_tasks: int
    modulation_layers: list[int]
    expansion_layers: list[int]
    tokens_per_task: int = 6
    predicted_multiplier: float = 1.0
    gated: bool = False

    @property
    def branch_layer(self) -> int | None:
        chosen = set(self.modulation_layers) | set(self.expansion_layers)
        return min(chosen) if chosen else None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Expansion:
    """An applied plan: the new modules and the hook handles (``remove()`` undoes the hooks)."""

    plan: ExpansionPlan
    modules: dict[str, nn.Module] = field(default_factory=dict)
    handles: list = field(default_factory=list)
    hooks: list[StreamHooks] = field(default_factory=list)

    def call_per_stream(self, enabled: bool) -> None:
        """Whether the blocks after the branch run one call per task stream when gradients are
        recorded (:mod:`mtlopt.tokens.stream_calls`), or one call on the stacked streams."""
        for hooks in self.hooks:
            hooks.per_stream = enabled

    def parameters(self) -> list[nn.Parameter]:
        return [p for module in self.modules.values() for p in module.parameters()]

    def modulation_parameters(self) -> list[nn.Parameter]:
        return [
            p
            for m in self.modules.values()
            if isinstance(m, TokenModulation)
            for p in m.parameters()
        ]

    def token_parameters(self) -> list[nn.Parameter]:
        return [
            p for m in self.modules.values() if isinstance(m, TaskTokens) for p in m.parameters()
        ]

    def gate_parameters(self) -> list[nn.Parameter]:
        return [
            p for m in self.modules.values() if isinstance(m, TokenGate) for p in m.parameters()
        ]

    def task_parameters(self) -> list[list[nn.Parameter]]:
        """``[task][...]``: the parameters each task owns (its modulation and its tokens)."""
        owned: list[list[nn.Parameter]] = [[] for _ in range(self.plan.num_tasks)]
        for module in self.modules.values():
            if isinstance(module, TokenModulation):
                lists = [module.weight, module.bias]
            elif isinstance(module, TokenGate):
                lists = [module.gate]
            else:
                lists = [module.tokens]
            for plist in lists:
                for task, parameter in enumerate(plist):
                    owned[task].append(parameter)
        return owned

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def block_layout(block: nn.Module, dim: int) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of a block's floating-point parameters (float32 / CPU if it has none)."""
    for p in block.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    return torch.get_default_dtype(), torch.device("cpu")


def expand(
    blocks: Sequence[nn.Module],
    plan: ExpansionPlan,
    dim: int | Sequence[int],
    generator: torch.Generator | None = None,
    mask_conventions: Mapping[str, bool] | None = None,
) -> Expansion:
    """Insert the plan's modules into ``blocks`` and make every block from the branch on run the
    K task streams. ``dim`` is the token width, one for all blocks or one per block; the new
    parameters take each block's dtype and device; task tokens are drawn from ``generator``."""
    expansion = Expansion(plan)
    branch = plan.branch_layer
    if branch is None:
        return expansion
    dims = [dim] * len(blocks) if isinstance(dim, int) else list(dim)
    if len(dims) != len(blocks):
        raise ValueError(f"{len(dims)} widths for {len(blocks)} blocks")
    k = plan.num_tasks
    conventions = dict(mask_conventions or {})
    for d, block in enumerate(blocks):
        if d < branch:
            continue
        if isinstance(block, nn.Sequential):
            raise TypeError(
                f"block {d} is an nn.Sequential: DTME registers its modules on the block, where a "
                "Sequential would run them as layers; wrap the Sequential in a Module whose "
                "forward calls it"
            )
        dtype, device = block_layout(block, dims[d])
        modulation = tokens = gate = None
        if d in plan.modulation_layers:
            modulation = TokenModulation(k, dims[d], dtype, device)
            block.add_module("dtme_modulation", modulation)
            expansion.modules[f"{d}.modulation"] = modulation
        if d in plan.expansion_layers and plan.tokens_per_task > 0:
            tokens = TaskTokens(
                k, plan.tokens_per_task, dims[d], generator=generator, dtype=dtype, device=device
            )
            block.add_module("dtme_tokens", tokens)
            expansion.modules[f"{d}.tokens"] = tokens
            if plan.gated:
                gate = TokenGate(k, dtype, device)
                block.add_module("dtme_gate", gate)
                expansion.modules[f"{d}.gate"] = gate
        hooks = StreamHooks(
            k, d == branch, modulation, tokens, conventions, batch_axis(block), gate
        )
        expansion.handles.append(block.register_forward_pre_hook(hooks.before, with_kwargs=True))
        expansion.handles.append(block.register_forward_hook(hooks.after, with_kwargs=True))
        expansion.handles.append(install(block, hooks, hooks.axis))
        expansion.hooks.append(hooks)
    if branch > 0:  # a new forward pass of these blocks: forget the previous pass's streams
        expansion.handles.append(blocks[0].register_forward_pre_hook(_reset_streams))
    return expansion


def _reset_streams(module: nn.Module, args: tuple) -> None:
    STREAMS.reset()


TOKEN_NAMES = ("src", "x", "hidden_states")


class StreamHooks:
    """The pre- and post-forward hooks of one block at or after the branch."""

    def __init__(
        self,
        num_tasks: int,
        branches: bool,
        modulation: TokenModulation | None,
        tokens: TaskTokens | None,
        conventions: Mapping[str, bool] | None = None,
        axis: int = 0,
        gate: TokenGate | None = None,
    ) -> None:
        self.axis = axis
        self.gate = gate if tokens is not None else None
        self.plain: tuple[tuple, dict] | None = None
        self.only: int | None = None
        self.k, self.branches, self.modulation, self.tokens = (
            num_tasks,
            branches,
            modulation,
            tokens,
        )
        self.conventions = dict(conventions or {})
        self.length = 0
        self.causal: bool | None = None
        self.per_stream = False
        """Call the block once per stream when gradients are recorded (set by DTME with a gradient
        base, :mod:`.stream_calls`)."""
        self.pending: list[tuple[tuple, dict]] | None = None
        self.pending_plain: list[tuple[tuple, dict]] | None = None
        """With a gate, the per-stream calls without the task tokens."""
        self.plain_output: Tensor | None = None
        """The per-stream calls' output without the task tokens, stacked (for the gate)."""

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        key = next((n for n in TOKEN_NAMES if n in kwargs), None) if not args else None
        if not args and key is None:
            raise ValueError(
                f"{type(module).__name__} was called without its tokens as the first positional "
                f"argument or as one of {', '.join(TOKEN_NAMES)}="
            )
        x = args[0] if args else kwargs[key]
        if not isinstance(x, Tensor) or x.is_nested or x.dim() != 3:
            raise _not_tokens(module, x)
        if self.axis:
            x = x.transpose(0, 1)  # [N, B, p] → [B, N, p]
        only = STREAMS.only
        if only is not None and not 0 <= only < self.k:
            raise IndexError(f"single_task({only}): the model has {self.k} task streams")
        streams = 1 if only is not None else self.k
        per_stream = self.per_stream and streams > 1 and torch.is_grad_enabled()
        if self.branches:
            STREAMS.start(streams, x.shape[0])
            if per_stream:
                chunks = begin_record(x, streams)
            elif streams > 1:
                x = x.repeat(streams, 1, 1)
        elif not STREAMS.branched or x.shape[0] != streams * STREAMS.batch:
            raise RuntimeError(
                "a block after the DTME branch point received an input that is not the K task "
                "streams: run the blocks in order in one forward pass"
            )
        elif per_stream:
            chunks = list(x.split(STREAMS.batch))
        self.length = x.shape[-2]
        names = argument_names(module, args)
        if self.tokens is not None:
            self._check_causal(module, names, args, kwargs)
        if per_stream:  # one call per stream, on its own parameter aliases (stream_calls)
            calls = [
                self._arguments(chunk, task, 1, names, args, kwargs, key)
                for task, chunk in enumerate(chunks)
            ]
            self.pending = [call for call, _ in calls]
            self.pending_plain = None if self.gate is None else [plain for _, plain in calls]
            self.only, self.plain = None, None
            return args, kwargs
        call, self.plain = self._arguments(x, only, streams, names, args, kwargs, key)
        self.only = only
        return call

    def _arguments(
        self,
        x: Tensor,
        task: int | None,
        streams: int,
        names: list[str],
        args: tuple,
        kwargs: dict,
        key: str | None,
    ) -> tuple[tuple[tuple, dict], tuple[tuple, dict] | None]:
        """The block's arguments for ``streams`` stacked streams (task ``task``'s alone when
        given): tokens modulated and extended, the other inputs fitted to them; and, where a
        :class:`TokenGate` blends the outputs, the arguments without the task tokens."""
        if self.modulation is not None:
            x = self.modulation(x, task)
        plain = x
        if self.tokens is not None:
            x = self.tokens(x, task)
        extra = self.tokens.tokens[0].shape[0] if self.tokens is not None else 0
        batch = STREAMS.batch
        call = self._call(x, key, names, args, kwargs, streams, batch, extra)
        if self.gate is None:
            return call, None
        return call, self._call(plain, key, names, args, kwargs, streams, batch, 0)

    def _call(
        self,
        x: Tensor,
        key: str | None,
        names: list[str],
        args: tuple,
        kwargs: dict,
        streams: int,
        batch: int,
        extra: int,
    ) -> tuple[tuple, dict]:
        """The block's arguments for the stacked streams ``x`` followed by ``extra`` task tokens."""

        def fit(name: str, value: object) -> object:
            return adapt(name, value, streams, batch, self.length, extra, self.conventions)

        rest = tuple(fit(n, a) for n, a in zip(names[1:], args[1:], strict=True))
        if self.axis:
            x = x.transpose(0, 1)
        kwargs = {name: (v if name == key else fit(name, v)) for name, v in kwargs.items()}
        if key is not None:
            kwargs[key] = x
            return (), kwargs
        return (x, *rest), kwargs

    def _check_causal(self, module: nn.Module, names: list[str], args: tuple, kwargs: dict) -> None:
        """Causal attention without a mask tensor (SDPA's ``is_causal``) hides tokens appended at
        the end from every real token: refuse rather than train task tokens that do nothing."""
        if self.causal is None:
            self.causal = any(getattr(m, "is_causal", False) is True for m in module.modules())
        if not self.causal:
            return
        given = dict(zip(names, args, strict=True)) | kwargs
        if not any(
            isinstance(v, Tensor) and ("mask" in n or "bias" in n) for n, v in given.items()
        ):
            raise ValueError(
                f"{type(module).__name__} attends causally without a mask tensor (is_causal), so "
                "task tokens appended after the sequence are invisible to every real token; "
                "build the model with attn_implementation='eager' (it always passes its causal "
                "mask, which DTME extends), or use expansion=False"
            )

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
        if self.tokens is None:
            return output
        plain, self.plain_output = self.plain_output, None
        if self.plain is not None:
            plain_args, plain_kwargs = self.plain
            self.plain = None
            plain = module.forward(*plain_args, **plain_kwargs)  # not __call__: no hooks again
            plain = plain if isinstance(plain, Tensor) else plain[0]
        if isinstance(output, Tensor):
            return self._finish(output, plain)
        if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
            return (self._finish(output[0], plain), *output[1:])
        raise TypeError(
            f"{type(module).__name__} returned {type(output).__name__}; expected tokens"
        )

    def _finish(self, output: Tensor, plain: Tensor | None) -> Tensor:
        """Drop the task tokens' output positions; blend with the plain output through the gate."""
        tokens = output[: self.length] if self.axis else output[:, : self.length]
        if plain is None or self.gate is None:
            return tokens
        gate = self.gate.values(self.only).to(tokens.dtype)
        streams = gate.shape[0]
        if self.axis:  # [N, S·B, p]
            shape = (tokens.shape[0], streams, -1, tokens.shape[-1])
            gate = gate[None, :, None, None]
        else:  # [S·B, N, p]
            shape = (streams, -1, *tokens.shape[1:])
            gate = gate[:, None, None, None]
        plain, tokens_ = plain.reshape(shape), tokens.reshape(shape)
        return (plain + gate * (tokens_ - plain)).reshape(tokens.shape)


def _not_tokens(module: nn.Module, x: object) -> ValueError:
    if isinstance(x, Tensor) and x.is_nested:
        return ValueError(
            f"{type(module).__name__} received a nested tensor (nn.TransformerEncoder's fast path "
            "with enable_nested_tensor=True in eval mode with a padding mask): DTME needs padded "
            "tokens; build the encoder with enable_nested_tensor=False, or pass the model to DTME "
            "(model=) so that it switches the fast path off"
        )
    shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
    return ValueError(
        f"{type(module).__name__} received {shape} as its tokens; DTME needs [B, N, p] tensors "
        "(batch first)"
    )
