"""Per-task gradients: one ``autograd.grad`` per present task, into the rows of the T×P ``J``.

Each task's backward asks for every trainable parameter (``allow_unused``): what comes back
``None`` is what the task does not reach, so reach is observed on every step at no extra backward
cost, and a parameter a task reaches is never left out of its gradient.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .partition import Partition, columns_of


@dataclass
class TaskGradients:
    jacobian: Tensor
    """Present tasks × P: row k is the k-th present task's gradient of the shared parameters."""
    own: list[dict[int, Tensor]]
    """Per present task: ``id(parameter) → gradient`` of the non-shared parameters it reached."""
    reached: list[tuple[bool, ...]]
    """Per present task: which trainable parameters its loss reached."""
    sparse: set[int]
    """``id``s of shared parameters whose gradient came back sparse: their columns of ``J`` are
    zeros, their gradients are in ``own``."""


def task_gradients(
    losses: Sequence[Tensor],
    trainable: Sequence[Tensor],
    partition: Partition,
    buffer: Tensor | None = None,
    retain_graph: bool = False,
) -> TaskGradients:
    """One ``autograd.grad`` per loss over every trainable parameter; graph freed at the end
    unless ``retain_graph`` (a strategy differentiates through it after the combination).

    Each task's shared gradient is written straight into its row of a preallocated matrix (into
    ``buffer`` when its shape, dtype and device fit, see :func:`reusable_buffer`); its other
    gradients are kept by parameter index (they are what the partition needs if this step makes a
    parameter shared)."""
    count = len(losses)
    per_task = (
        torch.autograd.grad(
            loss, trainable, retain_graph=retain_graph or k < count - 1, allow_unused=True
        )
        for k, loss in enumerate(losses)
    )
    return collect_task_gradients(per_task, trainable, partition, buffer, count)


def collect_task_gradients(
    per_task: Iterable[Sequence[Tensor | None]],
    trainable: Sequence[Tensor],
    partition: Partition,
    buffer: Tensor | None = None,
    num_tasks: int | None = None,
) -> TaskGradients:
    """:class:`TaskGradients` from each task's gradients of every trainable parameter (``None``:
    not reached), consumed one task at a time."""
    shared_ids = {id(p) for p in partition.shared}
    shared_index = [i for i, p in enumerate(trainable) if id(p) in shared_ids]
    shared_set = set(shared_index)
    if num_tasks is None:
        per_task = list(per_task)
        num_tasks = len(per_task)
    dtype = _real_dtype(partition.shared) if partition.shared else torch.get_default_dtype()
    device = partition.shared[0].device if partition.shared else trainable[0].device
    shape = (num_tasks, partition.num_shared)
    fits = buffer is not None and (buffer.shape, buffer.dtype, buffer.device) == (
        shape,
        dtype,
        device,
    )
    jacobian = buffer if fits else torch.empty(shape, dtype=dtype, device=device)
    own: list[dict[int, Tensor]] = []
    reached: list[tuple[bool, ...]] = []
    sparse: set[int] = set()
    for k, grads in enumerate(per_task):
        reached.append(tuple(g is not None for g in grads))
        found = {i for i in shared_index if grads[i] is not None and grads[i].is_sparse}
        if shared_index:
            pieces = [
                flat_gradient(None if i in found else grads[i], trainable[i]) for i in shared_index
            ]
            torch.cat(pieces, out=jacobian[k])
        sparse.update(id(trainable[i]) for i in found)
        own.append(
            {
                id(p): g
                for i, (p, g) in enumerate(zip(trainable, grads, strict=True))
                if g is not None and (i not in shared_set or i in found)
            }
        )
    return TaskGradients(jacobian, own, reached, sparse)


def reusable_buffer(jacobian: Tensor) -> Tensor | None:
    """``J``'s memory to be written again on the next step, on the host only.

    A fresh T×P block every step is, past glibc's ``mmap`` threshold (32 MB: T = 11 on a model
    of 790 k shared parameters), mapped, page-faulted and unmapped every step; reusing one
    costs nothing. On an accelerator the caching allocator already reuses blocks."""
    return jacobian if jacobian.device.type == "cpu" and jacobian.is_contiguous() else None


def rebuild_jacobian(grads: TaskGradients, old: Partition, new: Partition) -> Tensor:
    """``J`` under the ``new`` partition from the rows computed under ``old`` and the task's other
    gradients (a parameter that has just become shared was among those)."""
    before = old.column_ranges()
    rows = []
    for k in range(grads.jacobian.shape[0]):
        pieces = []
        for p in new.shared:
            span = before.get(id(p))
            if span is not None:
                pieces.append(grads.jacobian[k, span[0] : span[1]])
            else:
                pieces.append(flat_gradient(grads.own[k].get(id(p)), p))
        rows.append(torch.cat(pieces) if pieces else grads.jacobian.new_zeros(0))
    dtype = _real_dtype(new.shared) if new.shared else grads.jacobian.dtype
    return torch.stack(rows).to(dtype)


def flat_gradient(grad: Tensor | None, param: Tensor) -> Tensor:
    """A parameter's gradient as its columns of ``J`` (zeros for ``None``; a complex one as its
    real and imaginary parts)."""
    if grad is None:
        return torch.zeros(columns_of(param), dtype=_real_dtype([param]), device=param.device)
    if grad.is_complex():
        grad = torch.view_as_real(grad)
    return grad.reshape(-1)


def unflatten(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a P-vector into tensors shaped like ``like`` (complex ones from their real pairs)."""
    pieces = vector.split([columns_of(p) for p in like])
    return [
        torch.view_as_complex(piece.reshape(*p.shape, 2).contiguous())
        if p.is_complex()
        else piece.view_as(p)
        for piece, p in zip(pieces, like, strict=True)
    ]


def _real_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    dtype = tensors[0].real.dtype if tensors[0].is_complex() else tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.real.dtype if t.is_complex() else t.dtype)
    return dtype
