"""Task saliency on a shared representation: the hook that captures the representation ``z`` in
the forward pass, and the per-task gradients ``∂L_t/∂z`` taken with a graph (so that a
regulariser built from them is back-propagated through the heads: a double backward)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class RepresentationTap:
    """A forward hook on ``module`` that keeps its latest output (the shared representation)."""

    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"representation must be an nn.Module, got {type(module).__name__}")
        self.module = module
        self.output: Tensor | None = None
        self._handle = module.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, args: tuple, output: object) -> None:
        if isinstance(output, tuple):
            output = output[0]
        self.output = output if isinstance(output, Tensor) else None

    def take(self) -> Tensor:
        """The representation of the last forward pass (then forgotten, so that its graph is
        freed with the step's)."""
        z = self.output
        if z is None or not z.requires_grad:
            raise ValueError(
                f"no representation recorded: the step's losses must come from a forward pass "
                f"through {type(self.module).__name__} (the module given as representation=) with "
                "gradients enabled"
            )
        self.output = None
        return z

    def remove(self) -> None:
        self._handle.remove()


def saliencies(losses: Sequence[Tensor], z: Tensor) -> Tensor:
    """``[∂L_t/∂z for t]`` stacked (T × z.shape), differentiable (``create_graph=True``)."""
    rows = []
    for loss in losses:
        (grad,) = torch.autograd.grad(loss, z, retain_graph=True, create_graph=True, allow_unused=True)
        if grad is None:
            raise ValueError(
                "a task's loss does not depend on the recorded representation: was the model run "
                "again (another batch) between the training forward pass and the step?"
            )
        rows.append(grad)
    return torch.stack(rows)


def first_order_saliencies(losses: Sequence[Tensor], z: Tensor) -> Tensor:
    """``[∂L_t/∂z for t]`` stacked (T × z.shape), without a graph (for weights, not regularisers);
    a loss that does not reach ``z`` gives zeros, but at least one must reach it."""
    grads = [
        torch.autograd.grad(loss, z, retain_graph=True, allow_unused=True)[0] for loss in losses
    ]
    if all(g is None for g in grads):
        raise ValueError(
            "no task's loss depends on the recorded representation: was the model run again "
            "(another batch) between the training forward pass and the step?"
        )
    return torch.stack([torch.zeros_like(z) if g is None else g for g in grads])
