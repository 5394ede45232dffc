"""Which parameters are shared, which belong to one task, and how that changes during training.

The rule: a parameter is shared once two tasks or more have reached it (or when the user names it
in ``shared=``); otherwise it belongs to the one task that reaches it. Reach is accumulated over the
whole run (:class:`Reach`), so a task absent from the first batches, a parameter unfrozen later or a
new parameter group are taken in when they first appear: a task's gradient is never dropped on a
parameter it reaches. When the shared set changes, :func:`column_map` tells stateful strategies
(DB-MTL's EMA) where each parameter's columns of ``J`` went.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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


def reaches_other_leaves(loss: Tensor, params: Sequence[Tensor]) -> bool:
    """Whether ``loss``'s graph reaches a leaf that requires grad other than ``params`` (a
    parameter of another optimizer, an input with ``requires_grad``): a plain ``loss.backward()``
    would then write a ``.grad`` there too."""
    own = {id(p) for p in params}
    if loss.grad_fn is None:
        return loss.requires_grad and id(loss) not in own
    return any(
        getattr(node, "variable", None) is not None and id(node.variable) not in own
        for node in _nodes(loss)
    )


def compiled_graph(loss: Tensor) -> bool:
    """Whether ``loss`` comes out of a ``torch.compile``'d region: its backward is one opaque node
    through which every output reaches every parameter of the region."""
    return loss.grad_fn is not None and any(
        "CompiledFunction" in type(node).__name__ for node in _nodes(loss)
    )


def _nodes(loss: Tensor) -> Iterator:
    return graph_nodes([loss.grad_fn])


def graph_nodes(roots: Sequence) -> Iterator:
    """Every autograd node reachable from ``roots`` (graph nodes), each once."""
    seen = set(roots)
    stack = list(seen)
    while stack:
        node = stack.pop()
        yield node
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                seen.add(child)
                stack.append(child)


def columns_of(param: Tensor) -> int:
    """Columns a parameter takes in ``J``: a complex entry is two real ones (real, imaginary)."""
    return param.numel() * (2 if param.is_complex() else 1)


@dataclass
class Partition:
    """Which trainable parameters are shared, and which belong to one task only."""

    shared: list[Tensor]
    specific: list[list[Tensor]]
    """``specific[i]``: parameters reached by task ``i`` (of every task) and not shared."""
    blind: list[int] = field(default_factory=list)
    """Tasks that reach none of the shared parameters (their row of ``J`` is zero)."""
    sparse: list[Tensor] = field(default_factory=list)
    """Shared parameters with sparse gradients (``nn.Embedding(sparse=True)``): kept out of
    ``J``; they receive the task gradients weighted by the strategy's task weights."""

    @property
    def num_shared(self) -> int:
        return sum(columns_of(p) for p in self.shared)

    def column_ranges(self) -> dict[int, tuple[int, int]]:
        """``id(parameter) → (first, last + 1)`` columns of each shared parameter in ``J``."""
        ranges, start = {}, 0
        for p in self.shared:
            stop = start + columns_of(p)
            ranges[id(p)] = (start, stop)
            start = stop
        return ranges


def column_map(old: Partition, new: Partition) -> Tensor:
    """For each column of ``new``'s ``J``, the column of ``old``'s that held the same entry, or −1
    for a parameter that was not shared before."""
    before = old.column_ranges()
    pieces = []
    for p in new.shared:
        span = before.get(id(p))
        if span is None or span[1] - span[0] != columns_of(p):
            pieces.append(torch.full((columns_of(p),), -1, dtype=torch.long))
        else:
            pieces.append(torch.arange(span[0], span[1]))
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


class Reach:
    """The parameters each task has reached so far, accumulated over the run."""

    def __init__(self, num_tasks: int) -> None:
        self.by_task: list[set[int]] = [set() for _ in range(num_tasks)]
        self._seen: dict[tuple[int, tuple[int, ...]], tuple[bool, ...]] = {}

    def known(self, task: int, key: tuple[int, ...], reached: tuple[bool, ...]) -> bool:
        """Whether ``task`` already reached exactly this over the parameters ``key`` (their ids)."""
        return self._seen.get((task, key)) == reached

    def add(self, task: int, params: Sequence[Tensor], reached: tuple[bool, ...]) -> bool:
        """Record that ``task`` reached ``params[k]`` where ``reached[k]``; whether that is new."""
        key = (task, tuple(map(id, params)))
        if self._seen.get(key) == reached:
            return False
        self._seen[key] = reached
        before = len(self.by_task[task])
        self.by_task[task].update(id(p) for p, r in zip(params, reached, strict=True) if r)
        return len(self.by_task[task]) != before

    def copy(self) -> Reach:
        other = Reach(0)
        other.by_task = [set(s) for s in self.by_task]
        other._seen = dict(self._seen)
        return other


def partition_parameters(
    reach: Sequence[set[int]],
    trainable: Sequence[Tensor],
    shared: set[int] | None,
    never_shared: set[int] = frozenset(),  # type: ignore[assignment]
    owners: dict[int, int] | None = None,
    sparse: set[int] = frozenset(),  # type: ignore[assignment]
) -> tuple[Partition, list[int]]:
    """Split ``trainable`` into shared and task-specific parameters from each task's ``reach``
    (sets of parameter ids).

    Shared parameters whose ids are in ``sparse`` go to ``Partition.sparse`` instead of ``J``.
    With ``shared=None`` the shared parameters are those reached by two tasks or more, except
    ``never_shared`` ones (a strategy's own parameters, such as IMTL's per-task loss scales):
    those go to every task that reaches them. Returns the partition and the indices of other
    non-shared parameters that several tasks reach (a likely mistake in a user-given ``shared``).
    ``owners`` maps parameter ids to the one task that owns them (DTME's per-task modules: after
    the branch every task's graph touches every stream, but only the owner's gradient is non-zero).
    """
    owners = owners or {}
    counts = [sum(id(p) in r for r in reach) for p in trainable]
    own = [id(p) in never_shared or id(p) in owners for p in trainable]
    if shared is None:
        is_shared = [c >= 2 and not o for c, o in zip(counts, own, strict=True)]
    else:
        is_shared = [id(p) in shared and not o for p, o in zip(trainable, own, strict=True)]
    specific = [
        [
            p
            for p, s in zip(trainable, is_shared, strict=True)
            if not s and id(p) in r and owners.get(id(p), task) == task
        ]
        for task, r in enumerate(reach)
    ]
    multiply_reached = [
        i for i, c in enumerate(counts) if c >= 2 and not is_shared[i] and not own[i]
    ]
    shared_ids = {id(p) for p, s in zip(trainable, is_shared, strict=True) if s}
    blind = [task for task, r in enumerate(reach) if r and not (r & shared_ids)]
    partition = Partition(
        [p for p, s in zip(trainable, is_shared, strict=True) if s and id(p) not in sparse],
        specific,
        blind,
        [p for p, s in zip(trainable, is_shared, strict=True) if s and id(p) in sparse],
    )
    return partition, multiply_reached
