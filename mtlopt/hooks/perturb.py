"""Hook 2, perturb and re-evaluate: sharpness-aware per-task gradients through a closure.

For each present task ``t`` the parameters the task reaches are moved by ``ε_t`` (shared
parameters and the task's own parameters each scaled to norm ``ρ``, as F-MTL's and SAMO's code
do), the closure is re-evaluated there and ``g_t^SAM = ∇ℓ_t(θ + ε_t)`` taken; then every parameter
is restored bit for bit (a saved copy, not ``θ + ε − ε``) and so are the running statistics of the
normalisation layers the re-evaluation ran through (:func:`frozen_running_stats`). The strategy
decides the directions (:meth:`Perturbed.directions`) and how the gradients are combined.

The backward path then receives, for each task, a surrogate loss ``ℓ_t + ⟨θ − θ̄, g^SAM⟩`` (with
``θ̄`` detached): its value is the task's loss, its gradient exactly the task's SAM gradient, so
the shared parameters get the strategy's combination of the SAM gradients and each head its own
SAM gradient, by the usual path, at the cost of T dot products instead of T network backwards.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _NormBase

from ..engine import flat_gradient
from ..finite import finite_tensors
from ..tasks import Losses, StepTasks, read_losses
from ..window import detach_losses, with_values
from .feed import Fed

Grads = dict[int, Tensor]
"""``id(parameter) → gradient`` of one task."""


class Perturbed(Fed):
    """Mixin of strategies built on per-task sharpness-aware gradients."""

    hook: ClassVar[str] = "closure"
    rho: float

    def feed_hint(self) -> str:
        return (
            f"{self.info.name} re-evaluates the task losses at perturbed parameters: pass "
            "opt.step(closure) with a closure that computes the task losses of the step's batch "
            "(the same batch at every call; it is called once, then once per task)"
        )

    def directions(
        self, plain: list[Grads], shared: set[int], probe: Probe
    ) -> list[list[Grads]]:
        """Per present task, the parts of its perturbation direction; each part is scaled to norm
        ``rho``. ``plain[k]`` is task k's gradient of every parameter it reaches."""
        raise NotImplementedError

    def perturbation(self, parts: list[Grads], params: dict[int, Tensor]) -> Grads:
        """The offsets of one task's parameters from the parts of its direction: each part scaled
        to norm ``rho`` (SAM's ``ρ g/‖g‖``)."""
        return scaled(parts, self.rho)

    def plain_jacobian(self) -> Tensor:
        """The unperturbed per-task gradients as the rows of ``J`` (present tasks, the backward
        path's columns)."""
        return self.require_feed().plain_jacobian(getattr(self, "_present", None))

    def feed_commit(self) -> Callable[[], None]:
        return self.require_feed().commit


@contextmanager
def frozen_running_stats() -> Iterator[None]:
    """Within the block, the running statistics of every normalisation layer that runs (BatchNorm,
    InstanceNorm with ``track_running_stats``) are restored exactly afterwards, counters included.
    Found by a global forward pre-hook, so no model handle is needed."""
    saved: dict[int, tuple[torch.nn.Module, list[tuple[str, Tensor]]]] = {}

    def remember(module: torch.nn.Module, _: Any) -> None:
        if isinstance(module, _NormBase) and id(module) not in saved:
            buffers = [
                (name, b.detach().clone())
                for name, b in module.named_buffers(recurse=False)
                if b is not None
            ]
            saved[id(module)] = (module, buffers)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(remember)
    try:
        yield
    finally:
        handle.remove()
        with torch.no_grad():
            for module, buffers in saved.values():
                for name, value in buffers:
                    getattr(module, name).copy_(value)


class Probe:
    """Loss evaluations at moved parameters, for directions that need them (SAMO's zeroth-order
    estimate): ``losses_at(offsets)`` returns the present tasks' losses at ``θ + offsets``."""

    def __init__(
        self, closure: Callable[[], Losses], step: StepTasks, names: tuple[str, ...] | None,
        params: dict[int, Tensor],
    ) -> None:  # fmt: skip
        self.closure, self.step, self.names, self.params = closure, step, names, params
        self.commit: Callable[[], None] = lambda: None
        """Set by a direction that draws random numbers: advances its generator at the step."""

    def losses_at(self, offsets: Grads) -> Tensor:
        with moved(self.params, offsets), frozen_running_stats(), torch.no_grad():
            values = _present_losses(self.closure(), self.step, self.names)
        return detach_losses(values)


@contextmanager
def moved(params: dict[int, Tensor], offsets: Grads) -> Iterator[None]:
    """Parameters moved by ``offsets`` within the block, restored bit for bit afterwards."""
    saved = {pid: params[pid].detach().clone() for pid in offsets}
    try:
        with torch.no_grad():
            for pid, offset in offsets.items():
                params[pid].add_(offset.to(params[pid].dtype))
        yield
    finally:
        with torch.no_grad():
            for pid, value in saved.items():
                params[pid].copy_(value)


def _present_losses(losses: Losses, step: StepTasks, names: tuple[str, ...] | None) -> list[Tensor]:
    """The re-evaluated losses of the step's present tasks (checked lightly: they may come from a
    ``torch.no_grad`` evaluation)."""
    names = names if names is not None else step.names
    if isinstance(losses, Mapping):
        values = [losses.get(name) for name in names]
    elif isinstance(losses, Sequence) and len(losses) == len(names):
        values = list(losses)
    else:
        raise TypeError(f"the closure must return the {len(names)} task losses, got {losses!r}")
    present = [i for i, v in enumerate(values) if v is not None]
    if not np.array_equal(np.asarray(present), step.present):
        raise ValueError(
            "the closure returned other tasks when re-evaluated: it must compute the losses of "
            "the same batch at every call"
        )
    return [values[i].reshape(()) for i in present]


def scaled(parts: list[Grads], rho: float) -> Grads:
    """Each part scaled to norm ``rho`` (a zero part stays zero), merged."""
    out: Grads = {}
    for part in parts:
        if not part:
            continue
        norm = float(torch.stack([d.double().pow(2).sum() for d in part.values()]).sum().sqrt())
        factor = rho / (norm + 1e-12)
        out.update({pid: d * factor for pid, d in part.items()})
    return out


def sam_losses(
    optimizer: Any, strategy: Perturbed, closure: Callable[[], Losses]
) -> tuple[Losses, PerturbFeed]:
    """The surrogate losses whose gradients are the tasks' SAM gradients, and the feed that holds
    the unperturbed gradients."""
    with torch.enable_grad():
        losses = closure()
    names = optimizer._tasks
    step = read_losses(losses, names)
    trainable = optimizer._trainable()
    params = {id(p): p for p in trainable}
    plain: list[Grads] = []
    count = len(step.losses)
    for k, loss in enumerate(step.losses):
        grads = torch.autograd.grad(loss, trainable, retain_graph=k < count - 1, allow_unused=True)
        if any(g is not None and g.is_sparse for g in grads):
            raise NotImplementedError(
                f"{strategy.info.name} does not support sparse gradients (nn.Embedding(sparse=True))"
            )
        plain.append({id(p): g for p, g in zip(trainable, grads, strict=True) if g is not None})
    feed = PerturbFeed(optimizer, plain)
    values = detach_losses(step.losses)
    if not finite_tensors([g for grads in plain for g in grads.values()]):
        # Not perturbed: the backward path sees the non-finite gradients and raises or skips.
        return _surrogates(step, values, plain, params), feed
    shared = optimizer._shared_ids
    if shared is None:
        reached = Counter(pid for grads in plain for pid in grads)
        shared = {pid for pid, tasks in reached.items() if tasks > 1}
    probe = Probe(closure, step, names, params)
    directions = strategy.directions(plain, shared, probe)
    feed.commit = probe.commit
    sam: list[Grads] = []
    for k, parts in enumerate(directions):
        offsets = strategy.perturbation(parts, params)
        wanted = list(plain[k])
        with moved(params, offsets), frozen_running_stats(), torch.enable_grad():
            loss = _present_losses(closure(), step, names)[k]
            grads = torch.autograd.grad(loss, [params[pid] for pid in wanted], allow_unused=True)
        sam.append(
            {
                pid: torch.zeros_like(params[pid]) if g is None else g
                for pid, g in zip(wanted, grads, strict=True)
            }
        )
    return _surrogates(step, values, sam, params), feed


def _surrogates(
    step: StepTasks, values: Tensor, grads: list[Grads], params: dict[int, Tensor]
) -> dict[str, Tensor | None]:
    """Per present task, ``value + ⟨θ − θ̄, g⟩``: that value, and exactly the gradient ``g``."""
    out: dict[str, Tensor | None] = dict.fromkeys(step.names)
    for k, task in enumerate(step.present):
        linear = sum(
            ((params[pid] * g.detach()).sum() for pid, g in grads[k].items()),
            start=torch.zeros((), dtype=values.dtype, device=values.device),
        )
        out[step.names[task]] = with_values([linear], values[k : k + 1])[0]
    return out


class PerturbFeed:
    """The unperturbed per-task gradients, flattened on demand in the backward path's columns."""

    def __init__(self, optimizer: Any, plain: list[Grads]) -> None:
        self.optimizer = optimizer
        self.plain = plain
        self.commit: Callable[[], None] = lambda: None

    def plain_jacobian(self, present: np.ndarray | None) -> Tensor:
        shared = self.optimizer._partition.shared
        rows = self.plain  # the step's present tasks: a hooked step has no accumulation
        return torch.stack(
            [
                torch.cat([flat_gradient(grads.get(id(p)), p) for p in shared])
                if shared
                else torch.zeros(0)
                for grads in rows
            ]
        )
