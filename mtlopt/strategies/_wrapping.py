"""The shared plumbing of gradient strategies that wrap others (CR-MOGM, per-group aggregation):
the task count, task names, learned parameters, loss transforms and absent-task restriction are
passed on to every wrapped strategy."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..registry import create
from .base import GradientStrategy, Strategy


def wrapped_strategy(
    base: str | Strategy, num_tasks: int | None, kwargs: dict[str, Any] | None
) -> GradientStrategy:
    """``base`` as a gradient strategy instance (a name is created with ``kwargs``)."""
    if isinstance(base, str):
        base = create(base, num_tasks=num_tasks, **(kwargs or {}))
    elif kwargs:
        raise TypeError("base_kwargs are only accepted with a strategy name")
    if not isinstance(base, GradientStrategy):
        raise TypeError(
            f"{type(base).__name__} is not a gradient strategy: only strategies that combine the "
            "rows of J can be wrapped"
        )
    return base


class Wrapping(GradientStrategy):
    """A gradient strategy whose work is done by the strategies :meth:`inner` returns."""

    def inner(self) -> list[GradientStrategy]:
        raise NotImplementedError

    def _build(self) -> None:
        assert self.num_tasks is not None
        for strategy in self.inner():
            strategy.build(self.num_tasks)

    def name_tasks(self, names: tuple[str, ...]) -> None:
        super().name_tasks(names)
        for strategy in self.inner():
            strategy.name_tasks(names)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for strategy in self.inner() for p in strategy.parameters()]

    def transform_loss(self, index: int, loss: Tensor) -> Tensor:
        inner = self.inner()
        return inner[0].transform_loss(index, loss) if inner else loss

    @contextmanager
    def restricted_to(self, tasks: np.ndarray | None) -> Iterator[None]:
        with ExitStack() as stack:
            stack.enter_context(super().restricted_to(tasks))
            for strategy in self.inner():
                stack.enter_context(strategy.restricted_to(tasks))
            yield

    def observe_columns(self, shared: list[Tensor], param_groups: list[dict]) -> None:
        for strategy in self.inner():
            strategy.observe_columns(shared, param_groups)
