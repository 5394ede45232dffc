"""Per-task gradients: which parameters each task reaches, and the T×P Jacobian of the shared ones."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


def reached_parameters(loss: Tensor, candidates: Sequence[Tensor]) -> list[int]:
    """Indices of ``candidates`` that ``loss`` depends on, found by walking its autograd graph once."""
    index_of = {id(p): i for i, p in enumerate(candidates)}
    if loss.grad_fn is None:
        return [index_of[id(loss)]] if id(loss) in index_of else []
    reached: set[int] = set()
    for node in _nodes(loss):
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in index_of:
            reached.add(index_of[id(variable)])
    return sorted(reached)


def compiled_graph(loss: Tensor) -> bool:
    """Whether ``loss`` comes out of a ``torch.compile``'d region: its backward is one opaque node
    through which every output reaches every parameter of the region."""
    return loss.grad_fn is not None and any(
        "CompiledFunction" in type(node).__name__ for node in _nodes(loss)
    )


def _nodes(loss: Tensor):
    seen = {loss.grad_fn}
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        yield node
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                seen.add(child)
                stack.append(child)


@dataclass
class Partition:
    """Which trainable parameters are shared, and which belong to one task only."""

    shared: list[Tensor]
    specific: list[list[Tensor]]
    """``specific[i]``: parameters reached by task ``i`` and not shared."""
    blind: list[int] = field(default_factory=list)
    """Tasks that reach none of the shared parameters (their row of ``J`` is zero)."""

    @property
    def num_shared(self) -> int:
        return sum(p.numel() for p in self.shared)


def partition_parameters(
    losses: Sequence[Tensor],
    trainable: Sequence[Tensor],
    shared: set[int] | None,
    never_shared: set[int] = frozenset(),  # type: ignore[assignment]
    owners: dict[int, int] | None = None,
) -> tuple[Partition, list[int]]:
    """Split ``trainable`` into shared and task-specific parameters.

    With ``shared=None`` the shared parameters are those reached by two tasks or more, except
    ``never_shared`` ones (a strategy's own parameters, such as IMTL's per-task loss scales, whose
    entries each belong to one task): those go to every task that reaches them. Returns the
    partition and the indices of other non-shared parameters that several tasks reach (a likely
    mistake in a user-given ``shared``). ``owners`` maps parameter ids to the one task that owns
    them (DTME's per-task modules: after the branch every task's graph touches every stream, but
    only the owner's gradient is non-zero).
    """
    owners = owners or {}
    reach = [set(reached_parameters(loss, trainable)) for loss in losses]
    counts = [sum(i in r for r in reach) for i in range(len(trainable))]
    own = [id(p) in never_shared or id(p) in owners for p in trainable]
    if shared is None:
        is_shared = [c >= 2 and not o for c, o in zip(counts, own, strict=True)]
    else:
        is_shared = [id(p) in shared and not o for p, o in zip(trainable, own, strict=True)]
    specific = [
        [
            trainable[i]
            for i in sorted(r)
            if not is_shared[i] and owners.get(id(trainable[i]), task) == task
        ]
        for task, r in enumerate(reach)
    ]
    multiply_reached = [
        i for i, c in enumerate(counts) if c >= 2 and not is_shared[i] and not own[i]
    ]
    blind = [task for task, r in enumerate(reach) if not any(is_shared[i] for i in r)]
    partition = Partition(
        [p for p, s in zip(trainable, is_shared, strict=True) if s], specific, blind
    )
    return partition, multiply_reached


@dataclass
class TaskGradients:
    jacobian: Tensor
    """T×P: row i is task i's gradient with respect to the flattened shared parameters."""
    specific: list[list[Tensor | None]]
    """Gradients of each task's own parameters, aligned with ``Partition.specific``."""


def task_gradients(losses: Sequence[Tensor], partition: Partition) -> TaskGradients:
    """One ``autograd.grad`` per task over (shared + that task's parameters); graph freed at the end.

    Each task's shared gradient is written straight into its row of a preallocated T×P matrix.
    """
    shared = partition.shared
    num_tasks = len(losses)
    dtype = _common_dtype(shared) if shared else torch.get_default_dtype()
    device = shared[0].device if shared else losses[0].device
    jacobian = torch.empty(num_tasks, partition.num_shared, dtype=dtype, device=device)
    specific: list[list[Tensor | None]] = []
    for i, loss in enumerate(losses):
        inputs = [*shared, *partition.specific[i]]
        if not inputs:
            jacobian[i].zero_()
            specific.append([])
            continue
        grads = torch.autograd.grad(
            loss, inputs, retain_graph=i < num_tasks - 1, allow_unused=True, materialize_grads=True
        )
        if shared:
            torch.cat([g.reshape(-1) for g in grads[: len(shared)]], out=jacobian[i])
        specific.append(list(grads[len(shared) :]))
    return TaskGradients(jacobian, specific)


def _common_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype
