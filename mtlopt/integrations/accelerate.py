"""Accelerate: the usual loop on ``accelerator.prepare``-d objects, with :func:`backward` in place
of ``accelerator.backward``::

    model, opt, loader, sched = accelerator.prepare(model, MTLOptimizer(AdamW(...), "pcgrad"),
                                                    loader, sched)
    for batch in loader:
        with accelerator.accumulate(model):
            backward(accelerator, opt, task_losses(model, batch))
            opt.step(); sched.step(); opt.zero_grad()

``accelerator.save_state`` / ``load_state`` carry the strategy's state with the optimizer's (tensors
and Python numbers only, so ``torch.load``'s ``weights_only=True`` reads it).
"""

from __future__ import annotations

from typing import Any

from ..optimizer import MTLOptimizer, StepInfo
from ..tasks import Losses

__all__ = ["backward", "unwrap"]


def unwrap(optimizer: Any) -> MTLOptimizer:
    """The :class:`~mtlopt.MTLOptimizer` inside accelerate's (or another framework's) wrapper."""
    inner = optimizer
    while inner is not None and not isinstance(inner, MTLOptimizer):
        inner = getattr(inner, "optimizer", None)
    if inner is None:
        raise TypeError(
            f"{type(optimizer).__name__} does not wrap an mtlopt.MTLOptimizer: pass "
            "MTLOptimizer(torch.optim.AdamW(...), strategy) to accelerator.prepare"
        )
    return inner


def backward(accelerator: Any, optimizer: Any, losses: Losses) -> StepInfo:
    """``accelerator.backward`` for task losses: each is divided by the accumulation steps, as
    ``accelerator.backward`` divides a single loss, and back-propagated by the strategy."""
    steps = accelerator.gradient_accumulation_steps
    if isinstance(losses, dict):
        scaled: Any = {k: None if v is None else v / steps for k, v in losses.items()}
    else:
        scaled = [v / steps for v in losses]
    return unwrap(optimizer).backward(scaled)
