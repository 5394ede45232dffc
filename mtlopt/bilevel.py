"""What bilevel strategies (Auto-λ) need from a training step: the step's closure, the wrapped
optimizer's learning rates and momentum, and the model's parameters moved to a virtual point and
back without a trace.

* :func:`within_step` records the closure of the ``MTLOptimizer.step`` call being run, so that a
  strategy can re-evaluate the training losses of the same batch (:func:`step_closure`).
* :func:`virtual_point` is ``θ' = θ − η (g + μ m + λ θ)``, the step an SGD optimizer would take
  (the wrapped optimizer's per-group ``lr``, ``momentum`` buffer and ``weight_decay``).
* :func:`moved_to` evaluates the model at other parameter values: it swaps each parameter's
  storage (``p.data``), so autograd graphs built before keep their saved tensors untouched, and
  restores the storage of every parameter and buffer (BatchNorm statistics) on exit, also after
  an error. The official code deep-copies the model instead; both hold one more copy of θ.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

_CLOSURE: contextvars.ContextVar[Callable[[], Any] | None] = contextvars.ContextVar(
    "mtlopt_step_closure", default=None
)


@contextmanager
def within_step(closure: Callable[[], Any] | None) -> Iterator[None]:
    """Inside the block, :func:`step_closure` returns ``closure`` (``MTLOptimizer.step`` sets it)."""
    token = _CLOSURE.set(closure)
    try:
        yield
    finally:
        _CLOSURE.reset(token)


def step_closure() -> Callable[[], Any] | None:
    """The closure of the ``MTLOptimizer.step`` call being run (``None`` outside one, or when the
    step was given losses)."""
    return _CLOSURE.get()


def check_model(model: object) -> None:
    """A bilevel strategy's ``model=``: ``None`` (given later) or an ``nn.Module``."""
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def step_sizes(
    params: Sequence[Tensor], optimizer: torch.optim.Optimizer | None
) -> list[dict[str, Any]]:
    """Per parameter, the wrapped optimizer's ``lr``, ``weight_decay`` and momentum term ``μ m``
    (zero without an SGD momentum buffer); parameters it does not train get ``lr = 0``."""
    groups: dict[int, dict[str, Any]] = {}
    if optimizer is not None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                groups[id(p)] = group
    sizes = []
    for p in params:
        group = groups.get(id(p))
        if group is None:
            sizes.append({"lr": 0.0, "weight_decay": 0.0, "momentum": None})
            continue
        buffer = optimizer.state.get(p, {}).get("momentum_buffer") if optimizer else None
        momentum = None
        if buffer is not None and group.get("momentum", 0.0):
            momentum = buffer * group["momentum"]
        sizes.append(
            {
                "lr": float(group["lr"]),
                "weight_decay": float(group.get("weight_decay", 0.0) or 0.0),
                "momentum": momentum,
            }
        )
    return sizes


def virtual_point(
    params: Sequence[Tensor], grads: Sequence[Tensor], sizes: Sequence[dict[str, Any]]
) -> list[Tensor]:
    """``θ' = θ − η (g + μ m + λ θ)`` per parameter (the official Auto-λ virtual step)."""
    moved = []
    with torch.no_grad():
        for p, g, size in zip(params, grads, sizes, strict=True):
            step = g + size["weight_decay"] * p
            if size["momentum"] is not None:
                step = step + size["momentum"]
            moved.append(p - size["lr"] * step)
    return moved


@contextmanager
def moved_to(model: nn.Module, params: Sequence[Tensor], values: Sequence[Tensor]) -> Iterator[None]:
    """Within the block ``params`` hold ``values`` (leaves still: gradients are taken with respect
    to them); on exit their storage and the model's buffers are back as they were."""
    originals = [p.data for p in params]
    buffers = [(b, b.data) for b in model.buffers()]
    try:
        for b, original in buffers:
            b.data = original.clone()  # BatchNorm may update its statistics in place
        for p, v in zip(params, values, strict=True):
            p.data = v.detach().to(p.dtype)
        yield
    finally:
        for p, original in zip(params, originals, strict=True):
            p.data = original
        for b, original in buffers:
            b.data = original


def gradients_of(loss: Tensor, params: Sequence[Tensor], retain_graph: bool) -> list[Tensor]:
    """``∇ loss`` for each of ``params`` (zeros where the loss does not reach a parameter)."""
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def present_losses(
    given: Any, present: Sequence[int], names: Sequence[str] | None, method: str
) -> list[Tensor]:
    """The losses of the ``present`` tasks (indices in task order) from what a closure returned:
    a dict by task name or a sequence in task order. A present task without a loss is an error
    that names it."""
    if isinstance(given, Mapping):
        keys = list(names) if names else list(given)
        picked = [given.get(keys[i]) for i in present]
        wanted: list[Any] = [keys[i] for i in present]
    else:
        values = list(given.reshape(-1)) if isinstance(given, Tensor) else list(given)
        picked = [values[i] if i < len(values) else None for i in present]
        wanted = list(present)
    missing = [w for w, loss in zip(wanted, picked, strict=True) if loss is None]
    if missing:
        raise ValueError(
            f"{method}: the closure gave no loss for task(s) {missing}; it must give every task "
            "of the step a loss"
        )
    return [loss.reshape(()) for loss in picked]


def flatten(grads: Sequence[Tensor]) -> Tensor:
    """The gradients as one vector, in parameter order."""
    return torch.cat([g.reshape(-1) for g in grads])


def sgd_point(point: Sequence[Tensor], gradient: Tensor, lr: float) -> list[Tensor]:
    """``θ − lr g`` per parameter, ``g`` given as one vector in parameter order."""
    from .engine import unflatten

    with torch.no_grad():
        return [p - lr * g for p, g in zip(point, unflatten(gradient, point), strict=True)]
