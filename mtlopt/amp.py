"""Mixed precision: ``torch.amp.GradScaler`` with per-task gradients.

A ``GradScaler`` scales one loss; a multi-task step has T of them, and most strategies are not
invariant to the scale of the gradients they combine (GradNorm, Nash-MTL, CAGrad's radius, the
losses DWA or GradNorm read...). :class:`LossScaling` therefore scales every task loss, **unscales
the per-task gradients before the strategy combines them**, and re-scales only the combined result
it writes to ``.grad``, so that ``scaler.step(opt)`` unscales, checks and steps exactly as it does
for one loss. The scales a ``GradScaler`` uses are powers of two, so scaling and unscaling are exact.

An overflow (a non-finite gradient) in any task is the scaler's business, not an error: the wrapper
skips the combination and leaves an infinite value in one ``.grad``, so ``scaler.step`` skips the
optimizer step and ``scaler.update`` lowers the scale, as GradScaler does for a single loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class LossScaling:
    """Scales task losses with a ``GradScaler`` and undoes it on the per-task gradients."""

    def __init__(self, scaler: torch.amp.GradScaler) -> None:
        if not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        self.scaler = scaler

    @property
    def enabled(self) -> bool:
        return self.scaler.is_enabled()

    def scale(self, losses: Sequence[Tensor]) -> tuple[list[Tensor], float]:
        """The scaled losses and the scale factor (1 when the scaler is disabled)."""
        if not self.enabled:
            return list(losses), 1.0
        scaled = [self.scaler.scale(loss) for loss in losses]
        return scaled, float(self.scaler.get_scale())

    def signal_overflow(self, params: Sequence[Tensor]) -> None:
        """Leave an infinite gradient where ``scaler.unscale_`` will find it."""
        p = params[0]
        self.scaler.scale(torch.zeros((), device=p.device))  # initialises a fresh scaler
        if p.grad is None:
            p.grad = torch.full_like(p, float("inf"))
        else:
            p.grad.fill_(float("inf"))

    def check_step_allowed(self, optimizer: torch.optim.Optimizer) -> None:
        """Refuse ``optimizer.step()`` on still-scaled gradients (not called through the scaler)."""
        if not self.enabled:
            return
        states = getattr(self.scaler, "_per_optimizer_states", None)
        if states is None or id(optimizer) not in states:
            stage = None
        else:
            stage = getattr(states[id(optimizer)].get("stage"), "name", None)
        if stage == "READY" or stage is None:
            raise RuntimeError(
                "this MTLOptimizer has a GradScaler: its gradients are still scaled; step with "
                "scaler.step(opt) (or opt.step(losses), which does it), then call scaler.update()"
            )
