"""What F-MTL and SAMO share: a gradient strategy (the ``base``) that combines sharpness-aware
per-task gradients, with its state saved inside theirs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from torch import Tensor

from ..hooks import Perturbed
from ..registry import create
from .base import GradientStrategy


class SharpnessAware(Perturbed, GradientStrategy):
    """Perturbed gradients combined by any gradient strategy (``base``, a name or an instance)."""

    def __init__(
        self, base: str | GradientStrategy, rho: float, num_tasks: int | None,
        base_kwargs: dict[str, Any],
    ) -> None:  # fmt: skip
        super().__init__(num_tasks)
        if not rho > 0:
            raise ValueError(f"rho must be positive, got {rho}")
        if isinstance(base, str):
            base = create(base, num_tasks=num_tasks, **base_kwargs)
        elif base_kwargs:
            raise TypeError("base keyword arguments are only accepted with a base name")
        if not isinstance(base, GradientStrategy) or isinstance(base, Perturbed):
            raise TypeError(
                f"base must be a plain gradient strategy (pcgrad, mgda, upgrad, ...), got {base!r}"
            )
        if getattr(base, "hook", ""):
            raise TypeError(f"base {base.info.name} needs a hook of its own; use a plain one")
        self.base, self.rho = base, rho

    def _build(self) -> None:
        assert self.num_tasks is not None
        self.base.build(self.num_tasks)

    @contextmanager
    def restricted_to(self, tasks: np.ndarray | None) -> Iterator[None]:
        with super().restricted_to(tasks), self.base.restricted_to(tasks):
            yield

    def remap_columns(self, mapping: Tensor) -> None:
        self.base.remap_columns(mapping)

    def parameters(self) -> list:
        return self.base.parameters()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "base": self.base.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        own = {k: v for k, v in state.items() if k != "base"} if isinstance(state, dict) else state
        decoded = self._checked_state(own)
        if "base" not in state:
            raise KeyError(f"{self.info.name} state is missing its base's state")
        self.base.load_state_dict(state["base"])  # checked whole by the base before it changes
        for name, value in decoded.items():
            setattr(self, name, value)
