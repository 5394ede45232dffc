"""Lightning with a multi-task strategy, through manual optimisation.

::

    class Model(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            ...

        def configure_optimizers(self):
            return LightningMTLOptimizer(torch.optim.AdamW(self.parameters(), lr=1e-3), "pcgrad")

        def training_step(self, batch, batch_idx):
            mtl_step(self, {"a": loss_a, "b": loss_b})   # backward, step, log the diagnostics

Lightning keeps the step count, the precision context (``precision="bf16-mixed"``), the learning-
rate schedulers returned by ``configure_optimizers`` (step them in ``training_step`` as manual
optimisation requires) and the checkpoints, which hold the strategy's state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..optimizer import MTLOptimizer, StepInfo
from ..tasks import Losses

__all__ = ["LightningMTLOptimizer", "mtl_step"]


class LightningMTLOptimizer(MTLOptimizer):
    """:class:`~mtlopt.MTLOptimizer` as Lightning steps it: ``step(closure=...)``.

    Lightning's closure runs its hooks (``on_before_optimizer_step``, gradient clipping) and
    returns nothing in manual optimisation; the task losses reach :meth:`backward` before it.
    """

    def step(  # type: ignore[override]
        self,
        losses: Losses | Callable[[], Losses] | None = None,
        closure: Callable[[], Any] | None = None,
    ) -> StepInfo | None:
        if closure is not None:
            with torch.enable_grad():
                closure()
        return super().step(losses)


def mtl_step(module: Any, losses: Losses, log: bool = True) -> StepInfo:
    """Inside a manual-optimisation ``training_step``: zero the gradients, back-propagate the task
    losses through the module's :class:`LightningMTLOptimizer`, step it through Lightning (which
    counts the step) and log :meth:`StepInfo.as_dict` under ``mtl/``."""
    optimizer = module.optimizers()
    if isinstance(optimizer, list):
        raise ValueError("mtl_step expects configure_optimizers to return one optimizer")
    wrapped = optimizer.optimizer
    if not isinstance(wrapped, LightningMTLOptimizer):
        raise TypeError(
            "configure_optimizers must return mtlopt.integrations.lightning.LightningMTLOptimizer"
            f"(...), got {type(wrapped).__name__} (Lightning calls step(closure=...))"
        )
    optimizer.zero_grad()
    info = wrapped.backward(losses)
    optimizer.step()
    info = wrapped.last_step or info
    if log:
        module.log_dict({f"mtl/{k}": float(v) for k, v in info.as_dict().items()})
    return info
