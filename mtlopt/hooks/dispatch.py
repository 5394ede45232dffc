"""What the optimizer runs for the hooks: :func:`prepare` before a step's backward, :func:`ready`
at the start of every backward, :func:`feeding` around the backward."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..tasks import Losses
from .batches import BatchFeed, MultiBatch, draws_of
from .feed import Fed
from .perturb import Perturbed, sam_losses
from .signal import Observing, refresh


def prepare(
    optimizer: Any, losses: Any, closure: Callable[[], Losses] | None
) -> tuple[Any, Any]:
    """The losses ``step`` back-propagates and the feed the strategy needs with them (``None`` for
    strategies without a closure hook: the closure, if any, is simply evaluated)."""
    strategy = optimizer._combiner
    if not isinstance(strategy, Fed):
        if closure is not None:
            with torch.enable_grad():
                losses = closure()
        return losses, None
    _check_supported(optimizer, strategy)
    if isinstance(strategy, MultiBatch):
        draws = draws_of(strategy, losses, closure)
        return draws[-1], BatchFeed(optimizer, draws[:-1])
    assert isinstance(strategy, Perturbed)
    if closure is None:
        raise TypeError(strategy.feed_hint())
    return sam_losses(optimizer, strategy, closure)


def _check_supported(optimizer: Any, strategy: Fed) -> None:
    name = strategy.info.name
    if optimizer._scaling is not None:
        raise NotImplementedError(f"{name} with a GradScaler is not supported yet")
    if optimizer._replicas is not None:
        raise NotImplementedError(f"{name} under torch.distributed is not supported yet")
    if optimizer._window.info is not None:
        raise ValueError(
            f"{name} steps from a closure: gradient accumulation (backward() before step()) does "
            "not apply; call opt.zero_grad() first"
        )


def ready(optimizer: Any) -> None:
    """Refuse a backward that lacks what the strategy needs, before anything changes; record the
    signal sources' values at a step's first backward."""
    strategy = optimizer._combiner
    if isinstance(strategy, Fed) and strategy.feed is None:
        raise TypeError(strategy.feed_hint())
    if isinstance(strategy, Observing):
        if optimizer._window.info is None:
            refresh(optimizer)
        if not strategy.has_signal():
            raise TypeError(strategy.signal_hint())


@contextmanager
def feeding(strategy: Any, feed: Any) -> Iterator[None]:
    """``strategy.feed = feed`` for the block (nothing for a strategy without a closure hook)."""
    if feed is None or not isinstance(strategy, Fed):
        yield
        return
    strategy.feed = feed
    try:
        yield
    finally:
        strategy.feed = None
