"""Hook 1, the multi-batch closure: per-task gradients of several independent batches per step.

MoDo and SDMGrad update their task weights from the product ``J₁ J₂ᵀ`` of two Jacobians taken on
independent batches (an unbiased estimate of ``J Jᵀ``) and step along a third batch's ``J``.
:meth:`MTLOptimizer.step <mtlopt.MTLOptimizer.step>` gets the draws either from a closure, which it
calls ``batches`` times (each call must draw a new batch), or as a list of ``batches`` loss sets.
The last draw goes through the usual backward path (its gradients reach the heads); the others are
differentiated here, with respect to the shared parameters only, when the strategy combines.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ..engine import task_gradients
from ..tasks import Losses, read_losses
from .feed import Fed


class MultiBatch(Fed):
    """Mixin of strategies that combine the Jacobians of ``batches`` independent draws."""

    hook: ClassVar[str] = "batches"
    batches: int

    def feed_hint(self) -> str:
        return (
            f"{self.info.name} needs the task losses of {self.batches} independent batches per "
            f"step: pass opt.step(closure) with a closure that draws a new batch at each call (it "
            f"is called {self.batches} times), or opt.step([losses_1, ..., losses_{self.batches}])"
        )

    def other_jacobians(self) -> list[Tensor]:
        """``J`` of the draws before the last (the one the backward path differentiates): rows of
        the present tasks, columns of the shared parameters, as the path's ``J``."""
        return self.require_feed().jacobians(getattr(self, "_present", None))


def is_draws(losses: Any) -> bool:
    """Whether ``losses`` is a list of loss sets (``[losses_1, losses_2, ...]``)."""
    return (
        isinstance(losses, (list, tuple))
        and len(losses) > 0
        and all(isinstance(d, (Mapping, list, tuple)) for d in losses)
    )


def draws_of(
    strategy: MultiBatch, losses: Any, closure: Callable[[], Losses] | None
) -> list[Losses]:
    """The step's draws: ``closure`` called ``batches`` times, or the given list of loss sets."""
    count = strategy.batches
    if closure is not None:
        with torch.enable_grad():
            return [closure() for _ in range(count)]
    if is_draws(losses) and len(losses) == count:
        return list(losses)
    raise TypeError(strategy.feed_hint())


class BatchFeed:
    """The draws before the last, differentiated on demand with the optimizer's partition."""

    def __init__(self, optimizer: Any, draws: Sequence[Losses]) -> None:
        self.optimizer = optimizer
        self.draws = list(draws)

    def jacobians(self, present: np.ndarray | None) -> list[Tensor]:
        opt = self.optimizer
        names = opt._tasks
        wanted = np.arange(len(names)) if present is None else np.asarray(present)
        trainable = opt._trainable()
        out = []
        for number, draw in enumerate(self.draws, start=1):
            step = read_losses(draw, names)
            position = {int(t): k for k, t in enumerate(step.present)}
            missing = [names[t] for t in wanted if int(t) not in position]
            if missing:
                raise ValueError(
                    f"draw {number} of the step has no loss for task(s) {', '.join(missing)}: "
                    "every draw needs the tasks of the last one; nothing was changed"
                )
            rows = [step.losses[position[int(t)]] for t in wanted]
            jacobian = task_gradients(rows, trainable, opt._partition).jacobian
            if not bool(torch.isfinite(jacobian).all()):
                raise FloatingPointError(f"non-finite gradient in draw {number} of the step")
            out.append(jacobian)
        return out
