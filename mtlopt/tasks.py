"""What identifies a task: names, the tasks present in a step, and the checks on their losses.

A step's losses are a mapping ``name → loss`` (a sequence is read as ``task0, task1, ...``). The
task set is fixed once, by ``MTLOptimizer(..., tasks=[...])`` or by the first step's keys; later
steps may list the tasks in any order and may leave a task out (a missing key, or ``None`` in its
place). Every per-task quantity (strategy state, diagnostics, checkpoints) follows the name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

Losses = Sequence[Tensor | None] | Mapping[str, Tensor | None]


@dataclass(frozen=True)
class StepTasks:
    """The tasks of one step: every task's name, and which of them have a loss."""

    names: tuple[str, ...]
    """Every task, in the optimizer's order."""
    present: np.ndarray
    """Increasing indices (into ``names``) of the tasks that have a loss in this step."""
    losses: tuple[Tensor, ...]
    """The present tasks' losses, aligned with ``present``."""

    @property
    def all_present(self) -> bool:
        return len(self.present) == len(self.names)

    @property
    def restriction(self) -> np.ndarray | None:
        """``present``, or ``None`` when every task is present (what strategies are given)."""
        return None if self.all_present else self.present

    @property
    def present_names(self) -> list[str]:
        return [self.names[i] for i in self.present]


def default_names(count: int) -> tuple[str, ...]:
    return tuple(f"task{i}" for i in range(count))


def check_names(names: Sequence[object]) -> tuple[str, ...]:
    """Task names as given to ``tasks=``: distinct strings."""
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
        raise TypeError(f"tasks must be a list of task names, got {type(names).__name__}")
    if not names:
        raise ValueError("tasks must name at least one task")
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"task names must be strings, got {list(names)!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be distinct, got {list(names)!r}")
    return tuple(names)  # type: ignore[arg-type]


def read_losses(losses: Losses, known: tuple[str, ...] | None) -> StepTasks:
    """The step's tasks from ``losses``, checked against the ``known`` task names (``None`` on the
    first step without ``tasks=``: the step's keys then define them). Pure: changes nothing."""
    if isinstance(losses, Tensor):
        raise TypeError(
            "pass the task losses as a sequence or a dict (name -> loss) of scalar tensors, not "
            "one tensor (use list(losses) for a vector of losses)"
        )
    if isinstance(losses, Mapping):
        given = {_key(k): v for k, v in losses.items()}
    elif isinstance(losses, Sequence):
        values = list(losses)
        if known is not None and len(values) != len(known):
            raise ValueError(
                f"got {len(values)} losses in a list, but this optimizer has {len(known)} tasks "
                f"({', '.join(known)}); pass None for a task without a loss in this step, or a "
                "dict name -> loss"
            )
        given = dict(zip(known or default_names(len(values)), values, strict=True))
    else:
        raise TypeError(f"losses must be a dict or a sequence, got {type(losses).__name__}")
    if not given:
        raise ValueError("no losses given")
    names = known if known is not None else tuple(given)
    unknown = [k for k in given if k not in names]
    if unknown:
        raise KeyError(
            f"unknown task(s) {', '.join(map(repr, unknown))}: this optimizer's tasks are "
            f"{', '.join(map(repr, names))} (fixed by tasks= or by the first step)"
        )
    present = [i for i, name in enumerate(names) if given.get(name) is not None]
    if not present:
        raise ValueError(
            "no task has a loss in this step (every loss is None or missing); skip the step "
            "instead of calling step()/backward()"
        )
    tensors = tuple(_checked_loss(names[i], given[names[i]]) for i in present)
    return StepTasks(names, np.asarray(present, dtype=np.int64), tensors)


def _key(key: object) -> str:
    if not isinstance(key, str):
        raise TypeError(f"task names (the dict's keys) must be strings, got {key!r}")
    return key


def _checked_loss(name: str, loss: object) -> Tensor:
    if not isinstance(loss, Tensor):
        raise TypeError(f"loss of task {name!r} is a {type(loss).__name__}, not a tensor")
    if loss.numel() != 1:
        raise ValueError(
            f"loss of task {name!r} has shape {tuple(loss.shape)}; losses must be scalars "
            "(reduce it with .mean() or .sum())"
        )
    if not loss.requires_grad:
        raise ValueError(
            f"loss of task {name!r} does not require grad: it has no gradient path to any "
            "parameter (was it computed under torch.no_grad() or from detached tensors?); pass "
            "None for a task without labels in this batch"
        )
    return loss


def masked_mean(per_sample: Tensor, mask: Tensor) -> Tensor | None:
    """The mean of ``per_sample`` losses over the samples where ``mask`` is true, or ``None`` when
    no sample of the batch is labelled for the task (so the task is absent from the step).

    ``per_sample`` and ``mask`` have the same leading shape (``mask`` may have fewer trailing
    dimensions). Masked-out entries are excluded with ``torch.where``, so a NaN or inf computed
    for an unlabelled sample (a missing target stored as NaN) never reaches the gradient.

    Example::

        losses = {"seg": mtlopt.masked_mean(ce(seg_logits, seg), has_seg),
                  "depth": mtlopt.masked_mean(l1(depth_pred, depth), has_depth)}
        opt.step(losses)
    """
    mask = mask.to(torch.bool)
    while mask.dim() < per_sample.dim():
        mask = mask.unsqueeze(-1)
    mask = mask.expand_as(per_sample)
    count = mask.sum()
    if not bool(count):
        return None
    kept = torch.where(mask, per_sample, torch.zeros((), dtype=per_sample.dtype,
                                                     device=per_sample.device))
    return kept.sum() / count


def resolve_task(task: str | int, names: Sequence[str] | None, count: int | None) -> int:
    """The index of ``task`` (a name, or an index into the task order) among the optimizer's tasks.

    The one place where an option naming a task (``primary="seg"`` of PCD, Auto-λ's primary
    tasks) is turned into an index. A name needs the task names (known once the optimizer has
    fixed them: ``tasks=`` or the first step); an index needs only the count."""
    if isinstance(task, bool) or not isinstance(task, (str, int, np.integer)):
        raise TypeError(f"a task is named by a string or an index, got {task!r}")
    if isinstance(task, str):
        if names is None:
            raise ValueError(
                f"task {task!r} is named before the task names are known: give the optimizer "
                "tasks=[...], or name the task by its index"
            )
        if task not in names:
            raise KeyError(f"unknown task {task!r}: the tasks are {', '.join(map(repr, names))}")
        return list(names).index(task)
    index = int(task)
    total = len(names) if names is not None else count
    if index < 0 or (total is not None and index >= total):
        raise IndexError(f"task index {index} is out of range for {total} tasks")
    return index
