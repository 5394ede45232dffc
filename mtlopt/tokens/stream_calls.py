"""Blocks after the DTME branch called once per task stream, each call on its own parameter aliases.

With a gradient base, the optimizer needs each task's gradient of every shared parameter. After the
branch the blocks run K weight-sharing streams stacked on the batch axis, and task k's loss depends
on stream k only (DTME-MTL, Jeong & Yoon 2025, Proposition 2). Asking autograd for ``∂L_k/∂θ``
once per task then traverses all K streams every time: O(K²) block backward work.

Here each block from the branch on is called once per stream k, on ``B`` rows, with its parameters
``θ`` replaced by *aliases* ``θ_k = θ.view_as(θ)``: distinct autograd nodes over the same storage
(no copy, same values, same forward result as the stacked call up to floating-point summation
order). Stream k's computation uses ``θ_k`` only, so the gradient that reaches ``θ_k`` in one
backward of ``Σ_j L_j`` is ``∂L_k/∂θ`` through the blocks, for every kind of parameter (linear and
attention projections, norms, biases) and whatever the block does with it. Likewise stream k starts
from its own view ``s_k`` of the branching block's input ``x_b``, so the same backward leaves
``∂L_k/∂x_b`` at ``s_k``. :mod:`mtlopt.tokens.stream_gradients` turns those into each task's full
gradient. The call per stream is the one :func:`~mtlopt.tokens.single_task` inference makes (the
stream's own modulation and tokens, its masks), so every layout that supports single-task
inference supports it.

:class:`StreamRecord` keeps, for the last forward pass, ``x_b``, the ``s_k`` and the ``θ_k``.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

EXPANSION_MODULES = ("dtme_modulation", "dtme_tokens", "dtme_gate")


@dataclass
class StreamRecord:
    """What one forward pass through the per-stream blocks left for the backward."""

    num_tasks: int
    branch_input: Tensor
    """``x_b``: the branching block's input tokens, batch first ``[B, N, p]``."""
    stream_inputs: list[Tensor]
    """``s_k``: one view of ``x_b`` per stream; stream k starts from ``s_k`` only."""
    aliases: dict[int, tuple[nn.Parameter, list[tuple[int, Tensor]]]] = field(default_factory=dict)
    """``id(θ) → (θ, [(k, θ_k), ...])`` for every parameter of the blocks after the branch: one
    alias per stream, per use (a parameter shared by several blocks has one per block)."""

    def add(self, parameter: nn.Parameter, task: int, alias: Tensor) -> None:
        _, uses = self.aliases.setdefault(id(parameter), (parameter, []))
        uses.append((task, alias))


class _Current(threading.local):
    record: StreamRecord | None = None


CURRENT = _Current()


def begin_record(x: Tensor, num_tasks: int) -> list[Tensor]:
    """Start the record of a forward pass at the branch; the K stream inputs ``s_k``."""
    streams = [x.view_as(x) for _ in range(num_tasks)]
    CURRENT.record = StreamRecord(num_tasks, x, streams)
    return streams


def take_record() -> StreamRecord | None:
    """The last forward pass's record, forgotten here (it holds that pass's graph)."""
    record, CURRENT.record = CURRENT.record, None
    return record


class StreamForward:
    """The forward of one block at or after the branch: the stacked call, or (when its
    :class:`~mtlopt.tokens.expansion.StreamHooks` prepared per-stream calls) one call per stream on
    that stream's parameter aliases, outputs stacked back on the batch axis."""

    def __init__(self, block: nn.Module, hooks: Any, axis: int) -> None:
        self.block, self.hooks, self.axis = block, hooks, axis
        self.previous: Callable | None = block.__dict__.get("forward")
        self._slots: list[tuple[nn.Module, str]] | None = None
        try:  # the block's own signature, for the hooks that read its arguments' names
            original = self.previous or type(block).forward.__get__(block)
            self.__signature__ = inspect.signature(original)
        except (TypeError, ValueError):
            pass

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        calls = self.hooks.pending
        if calls is None:
            return self._original(*args, **kwargs)
        plains = self.hooks.pending_plain  # a TokenGate's calls without the task tokens
        self.hooks.pending = self.hooks.pending_plain = None
        record = CURRENT.record
        slots = self._parameter_slots()
        outputs, plain_outputs = [], []
        for task, (call_args, call_kwargs) in enumerate(calls):
            saved = [m._parameters[name] for m, name in slots]
            try:
                for (module, name), parameter in zip(slots, saved, strict=True):
                    alias = parameter.view_as(parameter)
                    module._parameters[name] = alias  # type: ignore[assignment]
                    if record is not None:
                        record.add(parameter, task, alias)  # type: ignore[arg-type]
                outputs.append(self._original(*call_args, **call_kwargs))
                if plains is not None:
                    plain_args, plain_kwargs = plains[task]
                    plain_outputs.append(self._original(*plain_args, **plain_kwargs))
            finally:
                for (module, name), parameter in zip(slots, saved, strict=True):
                    module._parameters[name] = parameter
        if plains is not None:
            plain = stack_outputs(plain_outputs, self.axis)
            self.hooks.plain_output = plain if isinstance(plain, Tensor) else plain[0]
        return stack_outputs(outputs, self.axis)

    def _original(self, *args: Any, **kwargs: Any) -> Any:
        if self.previous is not None:
            return self.previous(*args, **kwargs)
        return type(self.block).forward(self.block, *args, **kwargs)

    def _parameter_slots(self) -> list[tuple[nn.Module, str]]:
        """Where the block's own trainable parameters sit (the expansion's modules excluded: they
        are per task already and run in the hooks)."""
        if self._slots is None:
            skip = {
                id(m)
                for name in EXPANSION_MODULES
                if isinstance(getattr(self.block, name, None), nn.Module)
                for m in getattr(self.block, name).modules()
            }
            self._slots = [
                (module, name)
                for module in self.block.modules()
                if id(module) not in skip
                for name, p in module._parameters.items()
                if p is not None and p.requires_grad
            ]
        return self._slots


class ForwardHandle:
    """Undoes :func:`install`, like a hook handle."""

    def __init__(self, forward: StreamForward) -> None:
        self.forward = forward

    def remove(self) -> None:
        block = self.forward.block
        if block.__dict__.get("forward") is self.forward:
            if self.forward.previous is None:
                del block.__dict__["forward"]
            else:
                block.forward = self.forward.previous


def install(block: nn.Module, hooks: Any, axis: int) -> ForwardHandle:
    """Make ``block``'s forward a :class:`StreamForward` (an instance attribute, so the block keeps
    its type, parameters and ``state_dict``)."""
    forward = StreamForward(block, hooks, axis)
    block.forward = forward  # type: ignore[method-assign]
    return ForwardHandle(forward)


def stack_outputs(outputs: list[Any], axis: int) -> Any:
    """The streams' outputs stacked task-major on the batch axis (``axis`` for the tokens, 0 for
    the other tensors of a tuple such as attention weights)."""
    first = outputs[0]
    if isinstance(first, Tensor):
        return torch.cat(outputs, dim=axis)
    if isinstance(first, tuple) and first and isinstance(first[0], Tensor):
        return tuple(
            torch.cat(items, dim=axis if i == 0 else 0) if isinstance(items[0], Tensor) else items[0]
            for i, items in enumerate(zip(*outputs, strict=True))
        )
    raise TypeError(
        f"a block returned {type(first).__name__}; DTME's per-stream calls expect tokens or a "
        "tuple starting with them (use stream_gradients=False)"
    )

