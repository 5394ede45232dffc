"""Several torch optimizers stepped as one: the recommender setup (``SparseAdam`` for sparse
embeddings, ``Adam`` for the rest) under one :class:`~mtlopt.MTLOptimizer`."""

from __future__ import annotations

from collections import ChainMap, OrderedDict
from collections.abc import Callable
from typing import Any

import torch


def delegating_optimizer_init(optimizer: torch.optim.Optimizer, defaults: dict[str, Any]) -> None:
    """What ``torch.optim.Optimizer.__init__`` sets up, for an optimizer whose ``param_groups`` and
    ``state`` are views of other optimizers' (it must not call that ``__init__``, which would make
    groups of its own): the defaults, the hook registries and the patched ``step``."""
    optimizer.defaults = defaults
    optimizer._optimizer_step_pre_hooks = OrderedDict()
    optimizer._optimizer_step_post_hooks = OrderedDict()
    optimizer._optimizer_state_dict_pre_hooks = OrderedDict()
    optimizer._optimizer_state_dict_post_hooks = OrderedDict()
    optimizer._optimizer_load_state_dict_pre_hooks = OrderedDict()
    optimizer._optimizer_load_state_dict_post_hooks = OrderedDict()
    optimizer._patch_step_function()
    optimizer._warned_capturable_if_run_uncaptured = True


class OptimizerChain(torch.optim.Optimizer):
    """Steps several optimizers as one ``torch.optim.Optimizer``.

    ``param_groups`` is every optimizer's groups in order (so LR schedulers and GradScaler see them
    all), ``state`` a read view of every optimizer's state, ``step``/``zero_grad`` call each
    optimizer, ``add_param_group`` adds to the last one, and ``state_dict`` holds one state per
    optimizer. ``MTLOptimizer([sparse_adam, adam], ...)`` builds one for you.

    Example::

        sparse = torch.optim.SparseAdam(list(model.embeddings.parameters()), lr=1e-3)
        dense = torch.optim.Adam(list(model.towers.parameters()), lr=1e-3)
        opt = mtlopt.MTLOptimizer([sparse, dense], "pcgrad")
    """

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        if not optimizers:
            raise ValueError("OptimizerChain needs at least one optimizer")
        for optimizer in optimizers:
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise TypeError(f"expected torch optimizers, got {type(optimizer).__name__}")
        seen: set[int] = set()
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if id(p) in seen:
                        raise ValueError(
                            "a parameter is in two of the chained optimizers: give each "
                            "parameter to exactly one of them"
                        )
                    seen.add(id(p))
        self.optimizers = list(optimizers)
        delegating_optimizer_init(self, self.optimizers[-1].defaults)

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        raise AttributeError("set the param_groups of the chained optimizers themselves")

    @property
    def state(self) -> Any:  # type: ignore[override]
        return ChainMap(*(optimizer.state for optimizer in self.optimizers))

    @state.setter
    def state(self, value: Any) -> None:
        raise AttributeError("set the state of the chained optimizers themselves")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizers[-1].add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict.get("optimizers") if isinstance(state_dict, dict) else None
        if not isinstance(states, list) or len(states) != len(self.optimizers):
            raise ValueError(
                f"expected the state of {len(self.optimizers)} chained optimizers, got "
                f"{'none' if states is None else len(states)}"
            )
        for optimizer, state in zip(self.optimizers, states, strict=True):
            optimizer.load_state_dict(state)

    def __repr__(self) -> str:
        return f"OptimizerChain({', '.join(type(o).__name__ for o in self.optimizers)})"
