"""``mtlopt.diagnose``: a short run on your model that says which methods to try first.

It trains a copy of the model with equal weights (EW) for a few steps and records, per step, the
task losses, the norms of the task gradients on the shared parameters and their pairwise cosines;
optionally the token-space conflicts of the transformer blocks (DTME's statistics); and the cost
of a step of each class of method on this model. The rules that turn these into suggestions are
those of the docs page "Which method?".
"""

from __future__ import annotations

import copy
import itertools
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

SCALE_RATIO = 10.0
"""Loss or gradient-norm ratio (largest task over smallest) from which scales "differ"."""
CONFLICT_RATE = 0.25
"""Share of steps with a negative cosine from which a pair of tasks "conflicts"."""
MANY_TASKS = 10
TOKEN_CONFLICT = 0.3


@dataclass
class Diagnosis:
    """What :func:`diagnose` measured; ``str(diagnosis)`` is a Markdown report."""

    task_names: list[str]
    losses: Tensor
    """steps × T task losses."""
    gradient_norms: Tensor
    """steps × T norms of the task gradients on the shared parameters."""
    cosines: Tensor
    """steps × T × T cosines of the task gradients."""
    step_seconds: dict[str, float]
    """Median step on this model: ``loss`` class (one backward), ``gradient`` class (one
    ``autograd.grad`` per task)."""
    shared_parameters: int
    tokens: Any = None
    """The token-space :class:`~mtlopt.tokens.ConflictReport`, when asked for."""
    suggestions: list[str] = field(default_factory=list)

    @property
    def loss_ratio(self) -> float:
        """Largest over smallest mean task loss (1 when equal)."""
        mean = self.losses.abs().mean(0)
        return float(mean.max() / mean.min().clamp_min(1e-12))

    @property
    def gradient_norm_ratio(self) -> float:
        mean = self.gradient_norms.mean(0)
        return float(mean.max() / mean.min().clamp_min(1e-12))

    @property
    def conflict_rates(self) -> Tensor:
        """T × T share of steps on which the two tasks' gradients had a negative cosine."""
        return (self.cosines < 0).double().mean(0)

    @property
    def cost_ratio(self) -> float:
        """A gradient-class step over a loss-class step on this model."""
        return self.step_seconds["gradient"] / self.step_seconds["loss"]

    def worst_pair(self) -> tuple[str, str, float]:
        rates = self.conflict_rates
        pairs = itertools.combinations(range(len(self.task_names)), 2)
        i, j = max(pairs, key=lambda p: float(rates[p]), default=(0, 0))
        return self.task_names[i], self.task_names[j], float(rates[i, j])

    def to_markdown(self) -> str:
        names = self.task_names
        lines = [
            f"## mtlopt.diagnose: {len(names)} tasks, {self.losses.shape[0]} EW steps, "
            f"{self.shared_parameters:,} shared parameters",
            "",
            "| task | mean loss | mean gradient norm |",
            "|---|---|---|",
        ]
        for i, name in enumerate(names):
            lines.append(
                f"| {name} | {float(self.losses[:, i].mean()):.4g} | "
                f"{float(self.gradient_norms[:, i].mean()):.4g} |"
            )
        lines += [
            "",
            f"Loss ratio (largest / smallest task): {self.loss_ratio:.3g}; gradient-norm ratio: "
            f"{self.gradient_norm_ratio:.3g}.",
            "",
            "| pair | steps with conflicting gradients | mean cosine |",
            "|---|---|---|",
        ]
        rates, mean_cos = self.conflict_rates, self.cosines.mean(0)
        for i, j in itertools.combinations(range(len(names)), 2):
            lines.append(
                f"| {names[i]} ~ {names[j]} | {100 * float(rates[i, j]):.0f} % | "
                f"{float(mean_cos[i, j]):+.2f} |"
            )
        lines += [
            "",
            f"Step on this model: loss weighting {1e3 * self.step_seconds['loss']:.1f} ms, "
            f"gradient method {1e3 * self.step_seconds['gradient']:.1f} ms "
            f"({self.cost_ratio:.2f} × the loss weighting).",
        ]
        if self.tokens is not None:
            lines += [
                "",
                "Token-space conflict rates per block (range / null space): "
                + ", ".join(
                    f"{r:.2f}/{n:.2f}"
                    for r, n in zip(self.tokens.range_rates, self.tokens.null_rates, strict=True)
                ),
            ]
        lines += ["", "### Try first", "", *[f"- {s}" for s in self.suggestions]]
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return self.to_markdown()


def suggest(d: Diagnosis) -> list[str]:
    """The rules of the "Which method?" page, applied to a diagnosis."""
    out = [
        "A tuned EW baseline: the same budget with a few fixed task weights (e.g. a grid over "
        "{0.3, 1, 3} per task). Tuned scalarization is often competitive; compare every method "
        "with it (`mtlopt-bench run --problem ...` gives paired intervals against EW)."
    ]
    triggered = False
    scales = max(d.loss_ratio, d.gradient_norm_ratio)
    if scales >= SCALE_RATIO:
        triggered = True
        out.append(
            f"Scales differ ({scales:.3g} ×): scale-invariant loss weightings at the cost of EW: "
            "`uw`, `dwa`, `imtl_l`, `famo`; or the gradient methods `imtl`, `nash_mtl`, "
            "`aligned_mtl`, which are invariant to gradient scales."
        )
    a, b, rate = d.worst_pair()
    if rate >= CONFLICT_RATE:
        triggered = True
        out.append(
            f"Gradients conflict ({a} ~ {b} on {100 * rate:.0f} % of steps): conflict-aware "
            f"gradient methods `pcgrad`, `cagrad`, `nash_mtl`, `upgrad` "
            f"({d.cost_ratio:.2f} × a loss weighting's step here)."
        )
    if len(d.task_names) >= MANY_TASKS and d.cost_ratio > 3:
        triggered = True
        out.append(
            f"Many tasks: a gradient method's step costs {d.cost_ratio:.1f} × here; prefer "
            "the loss weightings `famo`, `uw`, `rlw`, or representation mode "
            "(`opt.backward(losses, features=z)`) for gradient methods."
        )
    if d.tokens is not None and max(d.tokens.range_rates, default=0.0) >= TOKEN_CONFLICT:
        triggered = True
        worst = max(range(len(d.tokens.range_rates)), key=d.tokens.range_rates.__getitem__)
        out.append(
            f"Token-space conflicts (range-space rate {d.tokens.range_rates[worst]:.2f} at block "
            f"{worst}): `dtme` (analysis, then per-task modulation and tokens), with `base=` a "
            "method suggested above."
        )
    if not triggered:
        out.append(
            "No strong imbalance or conflict: tuned EW is likely enough; `rlw` and `uw` cost no "
            "more and are worth one run each."
        )
    return out


def diagnose(
    model: nn.Module,
    batches: Callable[[int], Any] | Iterable[Any],
    losses: Callable[[nn.Module, Any], Sequence[Tensor] | Mapping[str, Tensor]],
    *,
    steps: int = 20,
    lr: float = 1e-3,
    shared: Iterable[Tensor] | None = None,
    tokens: bool = False,
    timing_steps: int = 5,
) -> Diagnosis:
    """Train a copy of ``model`` with EW for ``steps`` steps (Adam, ``lr``) and report.

    Args:
        model: your model; it is copied and left unchanged.
        batches: ``batches(step)`` or an iterable of batches (cycled).
        losses: ``losses(model, batch)``: the task losses, a list or a dict by task name.
        shared: the shared parameters of ``model`` (by default those reached by two tasks).
        tokens: also analyse token-space conflicts of the model's transformer blocks (found as
            :func:`mtlopt.tokens.find_blocks` finds them), as DTME's analysis does.
        timing_steps: steps timed for each class of method.
    """
    if steps < 2:
        raise ValueError(f"steps must be at least 2, got {steps}")
    work = copy.deepcopy(model)
    work.train()
    originals = dict(model.named_parameters())
    shared_ids = None
    if shared is not None:
        by_id = {id(p): name for name, p in originals.items()}
        names = {by_id[id(p)] for p in shared}
        shared_ids = {id(p) for name, p in work.named_parameters() if name in names}
    batch_at = _batch_source(batches)
    names, first = _named(losses(work, batch_at(0)))
    trainable = [p for p in work.parameters() if p.requires_grad]
    shared_mask = _shared(first, trainable, shared_ids)
    report = None
    if tokens:
        from .tokens import analyze_token_conflicts

        sample = [batch_at(s) for s in range(min(steps, 8))]
        report = analyze_token_conflicts(
            work, sample, lambda b: _named(losses(work, b))[1], len(names)
        )
    optimizer = torch.optim.Adam(trainable, lr=lr)
    recorded_losses, norms, cosines = [], [], []
    for step in range(steps):
        task = _named(losses(work, batch_at(step)))[1] if step else first
        grads = _task_gradients(task, trainable)
        jacobian = torch.stack(
            [
                torch.cat(
                    [_flat(g, p) for g, p, s in zip(row, trainable, shared_mask, strict=True) if s]
                )
                for row in grads
            ]
        ).double()
        norm = jacobian.norm(dim=1)
        unit = jacobian / norm.clamp_min(1e-30)[:, None]
        recorded_losses.append(torch.stack([t.detach().double() for t in task]))
        norms.append(norm)
        cosines.append(unit @ unit.T)
        for i, p in enumerate(trainable):  # EW: the sum of the task gradients
            present = [row[i] for row in grads if row[i] is not None]
            p.grad = torch.stack(present).sum(0) if present else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    timing = _time_classes(work, trainable, batch_at, losses, timing_steps)
    diagnosis = Diagnosis(
        task_names=names,
        losses=torch.stack(recorded_losses),
        gradient_norms=torch.stack(norms),
        cosines=torch.stack(cosines),
        step_seconds=timing,
        shared_parameters=sum(p.numel() for p, s in zip(trainable, shared_mask, strict=True) if s),
        tokens=report,
    )
    diagnosis.suggestions = suggest(diagnosis)
    return diagnosis


def _batch_source(batches: Callable[[int], Any] | Iterable[Any]) -> Callable[[int], Any]:
    if callable(batches):
        return batches
    cached = list(batches)
    if not cached:
        raise ValueError("batches is empty")
    return lambda step: cached[step % len(cached)]


def _named(losses: Sequence[Tensor] | Mapping[str, Tensor]) -> tuple[list[str], list[Tensor]]:
    if isinstance(losses, Mapping):
        return list(losses), list(losses.values())
    values = list(losses)
    return [f"task{i}" for i in range(len(values))], values


def _task_gradients(losses: list[Tensor], trainable: list[Tensor]) -> list[list[Tensor | None]]:
    """One ``autograd.grad`` per task over every trainable parameter (``None`` where unreached)."""
    return [
        list(
            torch.autograd.grad(
                loss, trainable, retain_graph=i < len(losses) - 1, allow_unused=True
            )
        )
        for i, loss in enumerate(losses)
    ]


def _shared(losses: list[Tensor], trainable: list[Tensor], given: set[int] | None) -> list[bool]:
    """Which trainable parameters are shared: those given, else those two tasks or more reach."""
    if given is not None:
        mask = [id(p) in given for p in trainable]
    else:
        reached = [
            [
                g is not None
                for g in torch.autograd.grad(loss, trainable, retain_graph=True, allow_unused=True)
            ]
            for loss in losses
        ]
        mask = [sum(row[i] for row in reached) >= 2 for i in range(len(trainable))]
    if not any(mask):
        raise ValueError(
            "no parameter is reached by two tasks or more: the tasks share nothing to combine; "
            "pass shared= if the model shares parameters in a way autograd cannot see"
        )
    return mask


def _flat(grad: Tensor | None, param: Tensor) -> Tensor:
    if grad is None:
        return param.new_zeros(param.numel())
    return (grad.to_dense() if grad.is_sparse else grad).reshape(-1)


def _time_classes(
    model: nn.Module,
    trainable: list[Tensor],
    batch_at: Callable[[int], Any],
    losses: Callable,
    repeats: int,
) -> dict[str, float]:
    def loss_class(batch: Any) -> None:
        torch.stack(_named(losses(model, batch))[1]).sum().backward()
        model.zero_grad(set_to_none=True)

    def gradient_class(batch: Any) -> None:
        _task_gradients(_named(losses(model, batch))[1], trainable)

    out = {}
    for name, run in (("loss", loss_class), ("gradient", gradient_class)):
        times = []
        for r in range(repeats + 1):
            batch = batch_at(r)
            start = time.perf_counter()
            run(batch)
            if r:  # the first is a warm-up
                times.append(time.perf_counter() - start)
        out[name] = statistics.median(times)
    return out
