"""Learning-rate schedulers and parameter groups added during training (DTME's new modules)."""

from __future__ import annotations

from typing import Any

import torch


def follow_new_groups(scheduler: Any, optimizer: torch.optim.Optimizer) -> None:
    """Let ``scheduler`` drive parameter groups added to ``optimizer`` after it was created.

    torch's schedulers keep one base rate (and, for ``LambdaLR``, one factor function) per group
    they were created with, and fail on more. A new group gets the first group's base rate and
    factor, so it follows the same schedule from the current step on. Call it after each optimizer
    step (the integrations register it as a step post-hook).
    """
    base = getattr(scheduler, "base_lrs", None)
    groups = optimizer.param_groups
    if base is None or len(base) >= len(groups):
        return
    for group in groups[len(base) :]:
        group["initial_lr"] = groups[0].get("initial_lr", groups[0]["lr"])
        base.append(group["initial_lr"])
        factors = getattr(scheduler, "lr_lambdas", None)  # LambdaLR, MultiplicativeLR
        if isinstance(factors, list):
            factors.append(factors[0])
        group["lr"] = groups[0]["lr"]
    scheduler._last_lr = [group["lr"] for group in groups]
