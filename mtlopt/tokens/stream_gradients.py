"""Every task's gradient after a DTME expansion in one K-stream backward (O(K), not O(K²)).

Notation: K tasks, losses ``L_k``, ``S = Σ_k L_k``; ``x_b`` the input of the branching block; the
per-stream calls of :mod:`mtlopt.tokens.stream_calls` give stream k its own view ``s_k`` of
``x_b`` and its own alias ``θ_k`` of every parameter ``θ`` of the blocks after the branch. Streams
are separate rows, so ``L_j`` does not depend on ``s_k`` or ``θ_k`` for ``j ≠ k`` (Proposition 2 of
DTME-MTL, Jeong & Yoon 2025: task i's modules receive no gradient from the other tasks). Hence,
for a parameter ``θ``,

    ∂L_k/∂θ = ∂S/∂θ_k  +  (∂x_b/∂θ)ᵀ ∂S/∂s_k  +  ∂L_k/∂θ|direct

1. **One backward of S** through the K streams to the ``s_k``, the ``θ_k`` and the parameters used
   directly after the blocks by one task only (its head, its modulation and tokens): the first
   term of every block parameter, the cotangent ``c_k = ∂S/∂s_k = ∂L_k/∂x_b`` of every task at the
   branch, and the whole gradient of the task-owned parameters.
2. **K backward passes through the trunk before the branch** only, ``(∂x_b/∂θ)ᵀ c_k``: the second
   term. With the branch at block 0 that is the embedding.
3. **Per task, the tail**: ``∂L_k/∂θ|direct`` for parameters that several tasks use after the
   blocks (a final norm over the stacked streams). autograd visits only what leads to them (the
   heads and that layer), not the blocks.

The work is one backward of the expanded model (as EW's) plus K trunk passes plus K tails, in place
of K backward passes of the whole expanded model. The result is the same per-task gradients, in
the layout of :func:`mtlopt.engine.task_gradients`. Where the decomposition does not apply (no
record of this forward pass, a parameter used both inside or before the streamed blocks and after
them, sparse gradients) a reason is returned instead and the caller takes the per-task path.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from ..engine import TaskGradients, flat_gradient
from ..partition import Partition
from .stream_calls import StreamRecord


def stream_task_gradients(
    losses: Sequence[Tensor],
    trainable: Sequence[Tensor],
    partition: Partition,
    record: StreamRecord | None,
) -> TaskGradients | str:
    """Per-task gradients of ``trainable`` from one K-stream backward (module docstring), or why
    they cannot be had that way. The graph is kept (the caller may fall back on it)."""
    k = len(losses)
    if record is None:
        return "no per-stream forward pass was recorded before these losses"
    if record.num_tasks != k:
        return f"{k} losses for {record.num_tasks} task streams"
    position = {id(p): i for i, p in enumerate(trainable)}
    aliased = [(p, uses) for pid, (p, uses) in record.aliases.items() if pid in position]
    starts = record.stream_inputs if record.branch_input.requires_grad else []
    stops = {t.grad_fn for t in starts} | {a.grad_fn for _, uses in aliased for _, a in uses}
    direct, found = _reached(losses, stops)
    if not found:
        return "the losses do not come from the last per-stream forward pass"
    before = _reached([record.branch_input], set())[0] if starts else set()
    tied = direct & ({id(p) for p, _ in aliased} | before)
    if tied:
        return (
            f"{len(tied)} parameter(s) are used after the blocks and also inside or before them "
            "(tied weights)"
        )
    owner = _owners(partition)
    used_directly = [p for p in trainable if id(p) in direct]
    owned = [p for p in used_directly if id(p) in owner]
    several = [p for p in used_directly if id(p) not in owner]
    trunk = [p for p in trainable if id(p) in before]

    flat_aliases = [a for _, uses in aliased for _, a in uses]
    grads = torch.autograd.grad(
        _total(losses),
        [*starts, *flat_aliases, *owned],
        retain_graph=True,
        allow_unused=True,
    )
    per_task: list[dict[int, Tensor]] = [{} for _ in range(k)]
    at_branch, rest = grads[: len(starts)], grads[len(starts) :]
    offset = 0
    for p, uses in aliased:
        for (task, _), g in zip(uses, rest[offset : offset + len(uses)], strict=True):
            _add(per_task[task], p, g)
        offset += len(uses)
    for p, g in zip(owned, rest[offset:], strict=True):
        _add(per_task[owner[id(p)]], p, g)
    for task in range(k):
        if trunk and at_branch and at_branch[task] is not None:
            through = torch.autograd.grad(
                record.branch_input,
                trunk,
                grad_outputs=at_branch[task],
                retain_graph=True,
                allow_unused=True,
            )
            for p, g in zip(trunk, through, strict=True):
                _add(per_task[task], p, g)
        if several:
            tail = torch.autograd.grad(losses[task], several, retain_graph=True, allow_unused=True)
            for p, g in zip(several, tail, strict=True):
                _add(per_task[task], p, g)
    if any(g.is_sparse for task in per_task for g in task.values()):
        return "sparse gradients"
    return _task_gradients(per_task, trainable, partition)


def _total(losses: Sequence[Tensor]) -> Tensor:
    total = losses[0].reshape(())
    for loss in losses[1:]:
        total = total + loss.reshape(())
    return total


def _add(grads: dict[int, Tensor], p: Tensor, g: Tensor | None) -> None:
    if g is None:
        return
    previous = grads.get(id(p))
    grads[id(p)] = g if previous is None else previous + g


def _owners(partition: Partition) -> dict[int, int]:
    """``id → task`` for parameters that belong to exactly one task."""
    counts = Counter(id(p) for params in partition.specific for p in params)
    return {
        id(p): task
        for task, params in enumerate(partition.specific)
        for p in params
        if counts[id(p)] == 1
    }


def _reached(roots: Iterable[Tensor], stops: set) -> tuple[set[int], bool]:
    """Ids of the leaf tensors reached from ``roots`` without passing the nodes in ``stops``, and
    whether any stop was met."""
    start = [r.grad_fn for r in roots if r.grad_fn is not None]
    seen, stack, reached, found = set(start), list(start), set(), False
    while stack:
        node = stack.pop()
        if node in stops:
            found = True
            continue
        variable = getattr(node, "variable", None)
        if variable is not None:
            reached.add(id(variable))
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                seen.add(child)
                stack.append(child)
    return reached, found


def _task_gradients(
    per_task: list[dict[int, Tensor]], trainable: Sequence[Tensor], partition: Partition
) -> TaskGradients:
    """The layout of :func:`mtlopt.engine.task_gradients`: shared gradients as rows of ``J``."""
    shared = {id(p) for p in partition.shared}
    rows = [
        torch.cat([flat_gradient(grads.get(id(p)), p) for p in partition.shared])
        if partition.shared
        else torch.zeros(0)
        for grads in per_task
    ]
    jacobian = torch.stack(rows)
    own = [{pid: g for pid, g in grads.items() if pid not in shared} for grads in per_task]
    reached = [tuple(id(p) in grads for p in trainable) for grads in per_task]
    return TaskGradients(jacobian, own, reached, set())
