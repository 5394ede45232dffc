"""Hook 3, the validation signal: held-out losses or per-task scores fed to the strategy.

``opt.observe(validation_losses=...)`` (CoBa) or ``opt.observe(scores=...)`` (PIVRG) records one
value per task — a dict ``name → value``, a sequence in task order or a vector — into the
strategy's state, which :meth:`MTLOptimizer.state_dict <mtlopt.MTLOptimizer.state_dict>` saves
(as tensors) and ``load_state_dict`` restores. A callable instead of a value is a *source*: the
optimizer calls it (under ``torch.no_grad``) before the first backward of every step and records
its result; sources are not saved (pass them again after loading a checkpoint).

A strategy reads a signal by declaring its name in ``signals`` and implementing
:meth:`Observing.observe_signal`; ``signal_closures`` names signals kept as callables and handed
to the strategy unevaluated (for a strategy that differentiates a validation loss itself).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ..tasks import check_names, default_names


class Observing:
    """Mixin of strategies that read a signal besides the training losses."""

    signals: ClassVar[tuple[str, ...]] = ()
    signal_closures: ClassVar[tuple[str, ...]] = ()
    info: Any

    def observe_signal(self, name: str, value: Any) -> None:
        """Record one observation (a float64 vector over all tasks, or a callable for
        ``signal_closures``)."""
        raise NotImplementedError

    def has_signal(self) -> bool:
        """Whether the strategy can step (a step before the first observation is refused)."""
        raise NotImplementedError

    def signal_hint(self) -> str:
        name = self.signals[0]
        return (
            f"{self.info.name} needs {name.replace('_', ' ')} before its first step: call "
            f"opt.observe({name}=...) with one value per task (or a function returning them, "
            "called before every step)"
        )


def observe(optimizer: Any, signals: dict[str, Any]) -> None:
    """:meth:`MTLOptimizer.observe <mtlopt.MTLOptimizer.observe>`: everything is checked before
    anything is recorded."""
    strategy = optimizer._combiner
    if not signals:
        raise TypeError("observe() needs a signal, e.g. observe(validation_losses=...)")
    wanted = (*getattr(strategy, "signals", ()), *getattr(strategy, "signal_closures", ()))
    unknown = sorted(set(signals) - set(wanted))
    if unknown:
        reads = ", ".join(wanted) if wanted else "no signal"
        raise TypeError(
            f"{strategy.info.name} reads {reads}; got {', '.join(unknown)}"
        )
    names = optimizer._tasks
    values: dict[str, Any] = {}
    sources: dict[str, Callable[[], Any]] = {}
    for key, value in signals.items():
        if key in getattr(strategy, "signal_closures", ()):
            if not callable(value):
                raise TypeError(f"{key} must be a function (a closure), got {type(value).__name__}")
            values[key] = value
        elif callable(value):
            sources[key] = value
        else:
            names, values[key] = per_task(key, value, names)
    if optimizer._tasks is None and names is not None:
        optimizer._fix_tasks(names)
    optimizer._signal_sources.update(sources)
    for key, value in values.items():
        strategy.observe_signal(key, value)


def refresh(optimizer: Any) -> None:
    """Evaluate the registered sources and record their values (before a step's first backward)."""
    sources = getattr(optimizer, "_signal_sources", None)
    if not sources:
        return
    strategy = optimizer._combiner
    names = optimizer._tasks
    recorded = {}
    for key, source in sources.items():
        with torch.no_grad():
            names, recorded[key] = per_task(key, source(), names)
    if optimizer._tasks is None and names is not None:
        optimizer._fix_tasks(names)
    for key, value in recorded.items():
        strategy.observe_signal(key, value)


def per_task(
    key: str, value: Any, names: tuple[str, ...] | None
) -> tuple[tuple[str, ...], np.ndarray]:
    """One finite float64 value per task, in task order (the names fixed from ``value`` when the
    optimizer has none yet, as a first step would)."""
    if isinstance(value, Tensor):
        value = list(value.detach().reshape(-1))
    if isinstance(value, Mapping):
        given = {str(k): v for k, v in value.items()}
        if names is None:
            names = check_names(list(given))
        missing = [n for n in names if given.get(n) is None]
        extra = sorted(set(given) - set(names))
        if missing or extra:
            raise ValueError(
                f"{key} needs one value for each task {list(names)}; missing {missing}, "
                f"unknown {extra}"
            )
        items = [given[n] for n in names]
    elif isinstance(value, Sequence) and not isinstance(value, str):
        items = list(value)
        if names is None:
            names = default_names(len(items))
        if len(items) != len(names):
            raise ValueError(f"{key} has {len(items)} values for {len(names)} tasks {list(names)}")
    else:
        raise TypeError(f"{key} must be a dict, a sequence or a vector, got {type(value).__name__}")
    array = np.array([float(torch.as_tensor(v).detach().double().cpu()) for v in items])
    if not np.all(np.isfinite(array)):
        raise FloatingPointError(f"non-finite {key} {array.tolist()}; nothing was recorded")
    return names, array
