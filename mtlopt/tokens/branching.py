"""Turning shared layers task-specific (Recon's surgery), on DTME's task streams.

A branched layer keeps its own parameters for task 0 and gets a deep copy per further task,
registered as its sub-module ``recon_copies`` (so its parameter names do not change, as with DTME's
modules). Its forward is replaced by one that runs copy ``t`` on task ``t``'s stream: the first
branched layer in the forward pass starts the K task streams (its input is shared: every copy
reads it), later ones split their K·B-row input into the K streams. Everything after the first
branched layer therefore runs on K·B rows, and the heads read their stream with
:func:`mtlopt.task_view`, exactly as after a DTME expansion (:mod:`mtlopt.tokens.streams`).
"""

from __future__ import annotations

import copy
import types
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .streams import STREAMS

COPIES = "recon_copies"


def branch_layers(layers: Sequence[nn.Module], chosen: Sequence[int], num_tasks: int) -> list:
    """Give each ``layers[i]`` for ``i`` in ``chosen`` its per-task copies (``chosen`` in forward
    order; the first of them starts the task streams); returns the hook handles to remove."""
    handles = []
    for rank, index in enumerate(sorted(chosen)):
        layer = layers[index]
        if hasattr(layer, COPIES):
            raise RuntimeError(f"layer {index} is already branched")
        copies = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_tasks - 1))
        layer.add_module(COPIES, copies)
        layer.forward = types.MethodType(_branched_forward(type(layer).forward, rank == 0), layer)
    first = min(chosen) if chosen else len(layers)
    for index in range(first + 1, len(layers)):
        if index not in chosen:
            handles.append(layers[index].register_forward_pre_hook(_widen, with_kwargs=True))
    if layers:
        handles.append(layers[0].register_forward_pre_hook(_reset_streams))
    return handles


def _widen(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A shared layer after the branch: its extra tensor arguments of B rows (padding masks) are
    repeated for the K streams its K·B-row input holds."""
    if not args or not STREAMS.branched or STREAMS.only is not None:
        return args, kwargs
    k, batch = STREAMS.num_tasks, STREAMS.batch
    if k == 1 or args[0].shape[0] != k * batch:
        return args, kwargs

    def fit(value: object) -> object:
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch:
            return value.repeat(k, *([1] * (value.dim() - 1)))
        return value

    return (args[0], *map(fit, args[1:])), {n: fit(v) for n, v in kwargs.items()}


def _reset_streams(module: nn.Module, args: tuple) -> None:
    STREAMS.reset()


def _branched_forward(forward, starts: bool):
    def run(self: nn.Module, x: Tensor, *args, **kwargs) -> Tensor:
        copies = getattr(self, COPIES)
        k = len(copies) + 1
        only = STREAMS.only
        if only is not None:  # single-task inference: that task's copy only
            if starts:
                STREAMS.start(1, x.shape[0])
            return forward(self, x, *args, **kwargs) if only == 0 else copies[only - 1](x, *args, **kwargs)
        if starts:
            STREAMS.start(k, x.shape[0])
            streams = [x] * k
        else:
            if not STREAMS.branched or x.shape[0] != k * STREAMS.batch:
                raise RuntimeError(
                    "a branched layer after the first one received an input that is not the K "
                    "task streams: run the layers in order in one forward pass"
                )
            streams = list(x.chunk(k))
        outputs = [forward(self, streams[0], *args, **kwargs)]
        outputs += [c(s, *args, **kwargs) for c, s in zip(copies, streams[1:], strict=True)]
        return torch.cat(outputs)

    return run


def task_copies(
    layers: Sequence[nn.Module], chosen: Sequence[int], num_tasks: int
) -> list[list[nn.Parameter]]:
    """``[task][...]``: each task's parameters of the branched layers (task 0: the originals)."""
    owned: list[list[nn.Parameter]] = [[] for _ in range(num_tasks)]
    for index in chosen:
        layer = layers[index]
        copies = getattr(layer, COPIES)
        owned[0] += [p for n, p in layer.named_parameters() if not n.startswith(COPIES + ".")]
        for t, c in enumerate(copies, start=1):
            owned[t] += list(c.parameters())
    return owned
