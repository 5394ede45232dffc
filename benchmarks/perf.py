"""``mtlopt-bench run perf``: step-time ratios measured side by side in one run.

Every ratio is measured on the QM9 set transformer and the MultiFashion ViT with T task heads, on
random inputs of the suite's shapes and batch sizes (no dataset needed: the cost of a step does not
depend on the values), with glibc's malloc thresholds pinned (:mod:`mtlopt_bench.allocator`).

Ratios are medians over rounds of per-round ratios: each round runs a contender's reference step
and its own back to back, in alternating order, so slow drifts of a shared machine cancel (see
:func:`paired`). In the floor table each strategy is timed against a floor of its own, one pair of
models alive at a time.

1. **Floor ratio**: each parameter-space gradient strategy through :class:`~mtlopt.MTLOptimizer`
   (defaults, diagnostics on) over the bare floor: one forward, one ``autograd.grad`` per task over
   the shared parameters and that task's head, the gradients summed into ``.grad``, one Adam step.
2. **Peer ratio**: ours over LibMTL 1.1.5's implementation of the same method, same model and batch.
3. **Modes**: representation mode (``features=``) and DTME (analysis phase; after its expansion)
   over EW; DTME after its expansion at K = 2, 5, 11, with and without a budget, with a gradient
   base, and single-task inference (``python3 -m benchmarks.perf --dtme`` runs that part alone).
4. **Solver share**: the time of the strategy's ``combine`` (Gramian, solver, ``wᵀJ``) and of its
   solver alone on the T×T Gramian, as shares of the strategy's median step, at T = 11.

5. **Small models** (:mod:`mtlopt_bench.perf_small`): every strategy over its floor on a 790 k
   parameter MLP at T = 2, 5, 11, and the overhead per step in microseconds on a tiny MLP.
6. **Solvers at many tasks** (:mod:`mtlopt_bench.perf_solvers`): each Gramian strategy's solver
   alone at T = 10 to 1000.

DTME's section and sections 5 and 6 also run alone:
``mtlopt-bench run perf --sections dtme,small,solvers`` prints them, writes them to
``OUT/perf/sections.md`` and, on a full run from a checkout, replaces them in docs/perf.md.
The many-task cost curve (time and memory against K up to 100) is the ``scaling`` problem.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import mtlopt
import mtlopt.tokens
from mtlopt.strategies.base import GramianStrategy, gramian_of

from . import allocator, libmtl_peer
from .models import SetTransformer, ViT

SOLVER_METHODS = ["nash_mtl", "cagrad", "mgda", "upgrad", "fairgrad"]
REPRESENTATION_METHODS = ["mgda", "pcgrad", "nash_mtl", "upgrad"]
ANALYSIS_OVER_FLOOR = "dtme, analysis phase over the T-backward floor (not over EW)"
NOISY = 1.2
SMOKE = (
    "**Smoke run** (quick: {rounds} timed rounds, {cells} cells, alongside whatever else the "
    "machine runs): it checks that every table is produced; its ratios are not measurements. "
    "A median of {rounds} rounds survives one disturbed round, not two: a floor ratio well above "
    "the measured one, or below 1 (impossible: the step contains the floor's work), means other "
    "processes took the CPU during those rounds. Cells whose rounds disagree by more than 20 % "
    "show their range. Measured ratios (9 rounds, quiet machine): docs/perf.md, refreshed by "
    "`mtlopt-bench run perf`."
)


@dataclass
class Bench:
    """A model with T heads, its fixed random batch and its task losses."""

    model: nn.Module
    losses: Callable[[nn.Module], list[torch.Tensor]]
    features: Callable[[nn.Module], tuple[torch.Tensor, list[torch.Tensor]]]
    shared: list[nn.Parameter]
    heads: list[list[nn.Parameter]]

    def clone(self) -> Bench:
        model = copy.deepcopy(self.model)
        return Bench(model, self.losses, self.features, *_split(model))


def _split(model: nn.Module) -> tuple[list[nn.Parameter], list[list[nn.Parameter]]]:
    heads = [list(h.parameters()) for h in model.heads]
    head_ids = {id(p) for h in heads for p in h}
    return [p for p in model.parameters() if id(p) not in head_ids], heads


def bench(kind: str, tasks: int, batch: int | None = None) -> Bench:
    torch.manual_seed(0)
    if kind == "multifashion":
        batch = batch or 128
        model: nn.Module = ViT([10] * tasks)
        images = torch.rand(batch, 36, 36)
        labels = torch.randint(0, 10, (batch, tasks))

        def heads_loss(outputs):
            return [nn.functional.cross_entropy(o, labels[:, i]) for i, o in enumerate(outputs)]

        def losses(m):
            return heads_loss(m(images))

        def features(m):
            z = m.encode(images)
            return z, heads_loss(m.decode(z))

    else:
        batch = batch or 64
        model = SetTransformer(tasks)
        atoms = torch.randint(0, 5, (batch, 29))
        atoms[:, 18:] = -1  # QM9 molecules have 18 atoms on average, padded to 29
        positions = torch.randn(batch, 29, 3)
        targets = torch.randn(batch, tasks)

        def heads_loss(outputs):
            return [(o - targets[:, i]).abs().mean() for i, o in enumerate(outputs)]

        def losses(m):
            return heads_loss(m(atoms, positions))

        def features(m):
            z = m.encode(atoms, positions)
            return z, heads_loss(m.decode(z, atoms))

    return Bench(model, losses, features, *_split(model))


def _adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-4)


def floor_step(b: Bench, inner: Callable[[nn.Module], torch.optim.Optimizer] = _adam) -> Callable[[], None]:
    """The T-backward floor: one forward, one ``autograd.grad`` per task (shared parameters and
    the task's head), the gradients summed into ``.grad``, one step of ``inner`` (Adam here)."""
    opt = inner(b.model)

    def step() -> None:
        opt.zero_grad()
        losses = b.losses(b.model)
        for i, (loss, head) in enumerate(zip(losses, b.heads, strict=True)):
            params = [*b.shared, *head]
            grads = torch.autograd.grad(loss, params, retain_graph=i < len(losses) - 1)
            for p, g in zip(params, grads, strict=True):
                p.grad = g if p.grad is None else p.grad.add_(g)
        opt.step()

    return step


def plain_step(b: Bench, inner: Callable[[nn.Module], torch.optim.Optimizer] = _adam) -> Callable[[], None]:
    """Plain training, the floor of a loss weighting: one forward, one backward of the summed
    losses, one step of ``inner`` (Adam here)."""
    opt = inner(b.model)

    def step() -> None:
        opt.zero_grad()
        torch.stack(b.losses(b.model)).sum().backward()
        opt.step()

    return step


_excluded = [0.0]
"""Seconds spent so far inside ``torch.autograd.grad`` (under :func:`counting_autograd`) and inside
the inner optimizer's steps of wrappers built with ``own=``: what the floor does too."""


@contextmanager
def counting_autograd() -> Iterator[None]:
    """Count the time of every ``torch.autograd.grad`` call into ``_excluded``."""
    original = torch.autograd.grad

    def grad(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            _excluded[0] += time.perf_counter() - start

    torch.autograd.grad = grad
    try:
        yield
    finally:
        torch.autograd.grad = original


def wrapper_step(
    b: Bench, method: str, own: list[float] | None = None, **kwargs
) -> Callable[[], None]:
    """Our step; with ``own``, each step appends the wrapper's own work to it: the time of
    ``opt.step(losses)`` less its ``autograd.grad`` calls and the inner Adam step (needs
    :func:`counting_autograd`)."""
    strategy = mtlopt.create(method, num_tasks=len(b.heads), **kwargs)
    inner = torch.optim.Adam(b.model.parameters(), lr=1e-4)
    opt = mtlopt.MTLOptimizer(inner, strategy)
    if own is not None:
        started = [0.0]
        inner.register_step_pre_hook(lambda *_: started.__setitem__(0, time.perf_counter()))
        inner.register_step_post_hook(
            lambda *_: _excluded.__setitem__(0, _excluded[0] + time.perf_counter() - started[0])
        )

    def step() -> None:
        opt.zero_grad()
        losses = b.losses(b.model)
        excluded, start = _excluded[0], time.perf_counter()
        opt.step(losses)
        if own is not None:
            own.append(time.perf_counter() - start - (_excluded[0] - excluded))

    return step


def representation_step(b: Bench, method: str) -> Callable[[], None]:
    strategy = mtlopt.create(method, num_tasks=len(b.heads))
    opt = mtlopt.MTLOptimizer(torch.optim.Adam(b.model.parameters(), lr=1e-4), strategy)

    def step() -> None:
        opt.zero_grad()
        z, losses = b.features(b.model)
        opt.backward(losses, features=z)
        opt.step()

    return step


def dtme_step(b: Bench, expanded: bool) -> Callable[[], None]:
    analysis = 2 if expanded else 10**9
    dtme = mtlopt.create(
        "dtme",
        blocks=b.model.blocks,
        num_tasks=len(b.heads),
        model=b.model,
        analysis_steps=analysis,
        covariance_steps=1,
    )
    opt = mtlopt.MTLOptimizer(torch.optim.Adam(b.model.parameters(), lr=1e-4), dtme)

    def step() -> None:
        opt.zero_grad()
        opt.step(b.losses(b.model))

    if expanded:
        for _ in range(analysis + 1):
            step()
    return step


def expanded_dtme(
    b: Bench, base: str = "ew", budget: float | None = None, stream_gradients: bool = True
) -> tuple[Callable[[], None], mtlopt.tokens.DTME]:
    """A DTME optimizer taken through a 2-step analysis to its expansion (and the first expanded
    step, which checks the stream gradients once), and its training step."""
    dtme = mtlopt.create(
        "dtme",
        model=b.model,
        num_tasks=len(b.heads),
        base=base,
        analysis_steps=2,
        covariance_steps=1,
        budget=budget,
        stream_gradients=stream_gradients,
    )
    opt = mtlopt.MTLOptimizer(torch.optim.Adam(b.model.parameters(), lr=1e-4), dtme)

    def step() -> None:
        opt.zero_grad()
        opt.step(b.losses(b.model))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the expensive-plan warning: measured here on purpose
        for _ in range(3):
            step()
    assert dtme.phase == "expanded"
    expected = "streams" if stream_gradients and base != "ew" else "per task"
    assert dtme.gradient_path == expected, dtme.gradient_path
    return step, dtme


def inference(b: Bench, task: int | None = None) -> Callable[[], None]:
    """One forward pass and the task losses without gradients; ``task``: only that task's stream
    (:func:`mtlopt.tokens.single_task`)."""

    def run() -> None:
        with torch.no_grad():
            if task is None:
                b.losses(b.model)
            else:
                with mtlopt.tokens.single_task(task):
                    b.losses(b.model)

    return run


GRADIENT_BASES = ["pcgrad", "upgrad"]


def dtme_table(
    kind: str, ks: list[int], rounds: int, warmup: int, progress
) -> tuple[list[str], list[str]]:
    """DTME's cost after the expansion at each K: over EW's step, with the default plan and with
    a budget (2×, or the last block's cost where K makes that more), with a gradient base
    (PCGrad, and PCGrad alone for reference), and inference (all tasks, one task) over the model
    before the expansion; predicted multipliers beside. Second table: each gradient base of
    :data:`GRADIENT_BASES` over DTME+EW, with one backward per task (``stream_gradients=False``)
    and with one K-stream backward (the default), in the same interleaved rounds."""
    lines = [
        "| K | plan (branch, predicted) | dtme+ew / ew | budget: plan | budget: dtme+ew / ew | "
        "dtme+pcgrad / ew | pcgrad / ew | inference, all tasks / plain | "
        "inference, one task / plain |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base_lines = [
        "| K | "
        + " | ".join(f"dtme+{m} / dtme+ew: per task | {m}: streams" for m in GRADIENT_BASES)
        + " |",
        "|---|" + "---|---|" * len(GRADIENT_BASES),
    ]
    for k in ks:
        base = bench(kind, k)
        ew = wrapper_step(base.clone(), "ew")
        default_b, budget_b = base.clone(), base.clone()
        default, default_dtme = expanded_dtme(default_b)
        # 2×, or what branching at the last block costs where K makes that more (K=11 on 4
        # blocks: (3 + 11) / 4 = 3.5×).
        depth = len(mtlopt.tokens.find_blocks(base.model))
        budget = max(2.0, (depth - 1 + k) / depth + 0.05)
        budgeted, budget_dtme = expanded_dtme(budget_b, budget=budget)
        plain = base.clone()
        pairs = {
            "default": (ew, default),
            "budget": (ew, budgeted),
            "pcgrad": (ew, wrapper_step(base.clone(), "pcgrad")),
            "all tasks": (inference(plain), inference(default_b)),
            "one task": (inference(plain), inference(default_b, task=0)),
        }
        for method in GRADIENT_BASES:
            for streams in (False, True):
                step, _ = expanded_dtme(base.clone(), base=method, stream_gradients=streams)
                pairs[method, streams] = (default, step)
        pairs["dtme+pcgrad"] = (ew, pairs["pcgrad", True][1])
        r = paired(pairs, rounds, warmup)
        lines.append(
            f"| {k} | {_plan(default_dtme)} | {r['default'].ratio:.2f} | "
            f"budget={budget:.2f}: {_plan(budget_dtme)} | "
            f"{r['budget'].ratio:.2f} | {r['dtme+pcgrad'].ratio:.2f} | {r['pcgrad'].ratio:.2f} | "
            f"{r['all tasks'].ratio:.2f} | {r['one task'].ratio:.2f} |"
        )
        base_lines.append(
            f"| {k} | "
            + " | ".join(
                f"{r[m, False].ratio:.2f} | {_mark(r[m, True].ratio, 1.3)}" for m in GRADIENT_BASES
            )
            + " |"
        )
        progress(f"dtme {kind} K={k}")
    return lines, base_lines


def _plan(dtme: mtlopt.tokens.DTME) -> str:
    plan = dtme.plan
    assert plan is not None
    return f"block {plan.branch_layer}, {plan.predicted_multiplier:.2f}×"


@dataclass
class Paired:
    ratio: float
    """Median over rounds of (contender's step / its reference's step in the same round)."""
    seconds: float
    reference_seconds: float
    low: float = 0.0
    high: float = 0.0
    """Smallest and largest per-round ratio."""
    rounds: list[tuple[float, float]] = field(default_factory=list)
    """``(contender's seconds, reference's seconds)`` of each measured round."""

    @property
    def noisy(self) -> bool:
        """Rounds disagreeing by more than 20 %: another process took the CPU in some of them."""
        return self.low > 0 and self.high / self.low > NOISY


def paired(
    pairs: dict[str, tuple[Callable[[], None], Callable[[], None]]], rounds: int, warmup: int
) -> dict[str, Paired]:
    """Each round times, for every contender, its reference step and its own step back to back:
    the ratio of the two cancels the machine's slow drifts (other jobs, frequency). The order
    alternates between rounds (reference first, then contender first) so that whatever the second
    of two steps gains or loses (warm caches, the allocator's state) falls on both alike."""
    ratios: dict[str, list[float]] = {name: [] for name in pairs}
    own: dict[str, list[float]] = {name: [] for name in pairs}
    ref: dict[str, list[float]] = {name: [] for name in pairs}
    for r in range(warmup + rounds):
        for name, (reference, step) in pairs.items():
            first, second = (reference, step) if r % 2 == 0 else (step, reference)
            start = time.perf_counter()
            first()
            middle = time.perf_counter()
            second()
            end = time.perf_counter()
            reference_seconds, step_seconds = (
                (middle - start, end - middle) if r % 2 == 0 else (end - middle, middle - start)
            )
            if r >= warmup:
                ratios[name].append(step_seconds / reference_seconds)
                own[name].append(step_seconds)
                ref[name].append(reference_seconds)
    return {
        name: Paired(
            statistics.median(ratios[name]),
            statistics.median(own[name]),
            statistics.median(ref[name]),
            min(ratios[name]),
            max(ratios[name]),
            list(zip(own[name], ref[name], strict=True)),
        )
        for name in pairs
    }


def gradient_methods() -> list[str]:
    """Gradient strategies stepped with ``step(losses)``; those that need a hook (several batches,
    perturbed re-evaluations) do more passes by design and are timed by the suite's time/EW."""
    return [
        n
        for n in mtlopt.available()
        if mtlopt.info(n).kind.value == "gradient" and not mtlopt.info(n).hooks
    ]


def floor_table(cells, rounds, warmup, progress) -> tuple[list[str], dict, list[str]]:
    """The floor ratios, the median step times, and the table of the wrapper's own work."""
    methods = gradient_methods()
    ratios: dict[tuple[str, int], dict[str, Paired]] = {}
    medians: dict[tuple[str, int], dict[str, float]] = {}
    own_lines = [
        "| cell | floor step (ms) | own work, median over strategies (ms) | share of the floor | "
        "largest (ms) | share |",
        "|---|---|---|---|---|---|",
    ]
    for kind, tasks in cells:
        base = bench(kind, tasks)
        own: dict[str, list[float]] = {m: [] for m in methods}
        result: dict[str, Paired] = {}
        # One strategy at a time against a floor of its own, as a user's process holds one model
        # and one optimizer (with all of them alive at once, the floor's step slowed down).
        for m in methods:
            with counting_autograd():
                pair = (floor_step(base.clone()), wrapper_step(base.clone(), m, own[m]))
                result |= paired({m: pair}, rounds, warmup)
        floor_seconds = statistics.median(r.reference_seconds for r in result.values())
        medians[kind, tasks] = {"floor": floor_seconds, **{m: r.seconds for m, r in result.items()}}
        ratios[kind, tasks] = result
        work = {m: statistics.median(times[warmup:] or times) for m, times in own.items()}
        typical = statistics.median(work.values())
        largest = max(work, key=work.__getitem__)
        own_lines.append(
            f"| {kind} T={tasks} | {1e3 * floor_seconds:.1f} | {1e3 * typical:.2f} | "
            f"{100 * typical / floor_seconds:.1f} % | {1e3 * work[largest]:.2f} ({largest}) | "
            f"{100 * work[largest] / floor_seconds:.1f} % |"
        )
        progress(f"floor ratio {kind} T={tasks}: floor {1e3 * floor_seconds:.1f} ms")
    lines = [
        "| strategy | " + " | ".join(f"{k} T={t}" for k, t in cells) + " |",
        "|---|" + "---|" * len(cells),
        "| floor step (ms) | "
        + " | ".join(f"{1e3 * medians[c]['floor']:.1f}" for c in cells)
        + " |",
    ]
    for m in methods:
        row = [ratios[c][m] for c in cells]
        lines.append(f"| {m} | " + " | ".join(_cell(r, 1.10) for r in row) + " |")
    return lines, medians, own_lines


def peer_table(cells, rounds, warmup, progress) -> list[str]:
    if not libmtl_peer.available():
        return ["LibMTL 1.1.5 is not installed (`pip install --no-deps libmtl==1.1.5`): skipped."]
    lines = [
        "| method | "
        + " | ".join(f"{k} T={t}: ours / LibMTL | LibMTL / floor" for k, t in cells)
        + " |",
        "|---|" + "---|---|" * len(cells),
    ]
    rows: dict[str, list[str]] = {m: [] for m in libmtl_peer.LIBMTL_METHODS}
    for kind, tasks in cells:
        base = bench(kind, tasks)
        floors = {"gradient": floor_step(base.clone()), "loss": plain_step(base.clone())}
        pairs = {}
        notes = {}
        for m in libmtl_peer.LIBMTL_METHODS:
            theirs = base.clone()
            try:
                run = libmtl_peer.libmtl_step(m, theirs.model, theirs.shared, tasks, 1e-4)

                def libmtl(run=run, b=theirs):
                    run(b.losses(b.model))

                libmtl()  # fails here if LibMTL cannot run this configuration
            except Exception as error:  # recorded in the table
                notes[m] = f"LibMTL fails: {type(error).__name__}: {str(error)[:60]}"
                continue
            pairs[m] = (libmtl, wrapper_step(base.clone(), m))
            pairs[f"libmtl:{m}"] = (floors[mtlopt.info(m).kind.value], libmtl)
        result = paired(pairs, rounds, warmup)
        for m in rows:
            if m in notes:
                rows[m] += [notes[m], "–"]
            else:
                rows[m] += [_cell(result[m], 0.7), _cell(result[f"libmtl:{m}"])]
        progress(f"peer ratio {kind} T={tasks}")
    lines += [f"| {m} | " + " | ".join(r) + " |" for m, r in rows.items()]
    return lines


def modes_table(cells, rounds, warmup, progress) -> list[str]:
    lines = [
        "| mode | " + " | ".join(f"{k} T={t}" for k, t in cells) + " |",
        "|---|" + "---|" * len(cells),
    ]
    rows: dict[str, list[str]] = {}
    for kind, tasks in cells:
        base = bench(kind, tasks)
        ew = wrapper_step(base.clone(), "ew")
        steps = {
            f"{m}, representation mode": representation_step(base.clone(), m)
            for m in REPRESENTATION_METHODS
        }
        steps["dtme, analysis phase"] = dtme_step(base.clone(), expanded=False)
        steps["dtme, after expansion"] = dtme_step(base.clone(), expanded=True)
        pairs = {name: (ew, step) for name, step in steps.items()}
        pairs[ANALYSIS_OVER_FLOOR] = (floor_step(base.clone()), steps["dtme, analysis phase"])
        result = paired(pairs, rounds, warmup)
        ew_seconds = statistics.median(
            r.reference_seconds for name, r in result.items() if name != ANALYSIS_OVER_FLOOR
        )
        rows.setdefault("ew step (ms)", []).append(f"{1e3 * ew_seconds:.1f}")
        for name, r in result.items():
            rows.setdefault(name, []).append(
                _cell(r) if name == ANALYSIS_OVER_FLOOR else _cell(r, 1.3)
            )
        progress(f"modes {kind} T={tasks}")
    lines += [f"| {n} | " + " | ".join(r) + " |" for n, r in rows.items()]
    return lines


def solver_table(kind: str, tasks: int, step_medians: dict[str, float], repeats: int) -> list[str]:
    b = bench(kind, tasks)
    losses = b.losses(b.model)
    jacobian = torch.stack(
        [
            torch.cat(
                [g.reshape(-1) for g in torch.autograd.grad(loss, b.shared, retain_graph=True)]
            )
            for loss in losses
        ]
    )
    loss_values = torch.stack([loss.detach() for loss in losses]).double()
    lines = [
        f"| strategy | step (ms) | combine (ms) | share of the step | solver on the {tasks}×{tasks} "
        "Gramian (ms) | share |",
        "|---|---|---|---|---|---|",
    ]
    for m in SOLVER_METHODS:
        strategy = mtlopt.create(m, num_tasks=tasks)
        combine = _median_time(lambda s=strategy: s.combine(jacobian, loss_values), repeats)
        assert isinstance(strategy, GramianStrategy)
        gramian, array = gramian_of(jacobian), loss_values.numpy()
        solver = _median_time(lambda s=strategy, g=gramian, a=array: s.weigh(g, a), repeats)
        step = step_medians[m]
        lines.append(
            f"| {m} | {1e3 * step:.1f} | {1e3 * combine:.2f} | {_mark(combine / step, 0.05, pct=True)}"
            f" | {1e3 * solver:.3f} | {_mark(solver / step, 0.05, pct=True)} |"
        )
    return lines


def vjp_table(cells, rounds, warmup, progress, build=None) -> list[str]:
    """Sequential per-task ``autograd.grad`` (the engine's path) against one batched VJP
    (``is_grads_batched``, vmap over the T cotangents) for the T×P matrix of shared gradients;
    ``build(kind, tasks)`` makes each cell's model (:func:`bench` by default)."""
    lines = [
        "| model | sequential (ms), median | batched (ms), median | batched / sequential, median "
        "of per-round ratios |",
        "|---|---|---|---|",
    ]
    for kind, tasks in cells:
        b = (build or bench)(kind, tasks)

        def sequential(b=b, tasks=tasks):
            losses = b.losses(b.model)
            for i, loss in enumerate(losses):
                torch.autograd.grad(loss, b.shared, retain_graph=i < tasks - 1)

        def batched(b=b, tasks=tasks):
            losses = torch.stack(b.losses(b.model))
            eye = torch.eye(tasks)
            torch.autograd.grad(losses, b.shared, grad_outputs=eye, is_grads_batched=True)

        r = paired({"batched": (sequential, batched)}, rounds, warmup)["batched"]
        lines.append(
            f"| {kind} T={tasks} | {1e3 * r.reference_seconds:.1f} | {1e3 * r.seconds:.1f} | "
            f"{_cell(r)} |"
        )
        progress(f"vjp {kind} T={tasks}")
    return lines


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cell(p: Paired, target: float | None = None) -> str:
    """A ratio, bold above its target, with its per-round range when the rounds disagree."""
    text = f"{p.ratio:.2f}" if target is None else _mark(p.ratio, target)
    return f"{text} (noisy: {p.low:.2f}–{p.high:.2f})" if p.noisy else text


def _mark(value: float, target: float, pct: bool = False) -> str:
    text = f"{100 * value:.1f} %" if pct else f"{value:.2f}"
    return text if value <= target else f"**{text}**"


DTME_SECTION = [
    "## DTME after its expansion: cost against K, budget, gradient base, inference",
    "",
    "QM9 model (4 blocks). Training steps over EW's step; the plan is the one DTME chose after a "
    "2-step analysis on the benchmark's random batch: the branch block b and the predicted block "
    "compute c(b) = (b + K(D − b))/D plus the task tokens' share (`mtlopt.tokens.budget`), which "
    "counts the blocks only (embedding, heads and the optimizer step are not multiplied), so the "
    "measured step ratio sits below it when the blocks are a part of the step. `budget=2` bounds "
    "the prediction at 2×. dtme+pcgrad: DTME with PCGrad as its base, every task's gradient from "
    "one backward through the K streams (the default). Inference: one no-grad forward pass over "
    "the model before the expansion; one task runs only task 0's stream "
    "(`mtlopt.tokens.single_task`).",
    "",
]

DTME_BASES_SECTION = [
    "### A gradient base on the expanded model: one backward per task or one for all",
    "",
    "Same plans, same rounds. DTME with a gradient base over DTME with EW (target ≤ 1.3): "
    "per task, one backward per task through all K streams (`stream_gradients=False`, O(K²)); "
    "streams, one backward through the K streams plus K passes through the blocks before the "
    "branch (the default, `mtlopt.tokens.stream_gradients`).",
    "",
]


def run_dtme(quick: bool, progress=print) -> str:
    """The DTME section alone: ``python3 -m benchmarks.perf --dtme [--quick]``."""
    torch.manual_seed(0)
    pinned = allocator.pin()
    rounds, warmup = (3, 1) if quick else (9, 1)
    ks = [2, 5] if quick else [2, 5, 11]
    start = time.perf_counter()
    lines, base_lines = dtme_table("qm9", ks, rounds, warmup, progress)
    return "\n".join(
        [
            *DTME_SECTION,
            f"{rounds} rounds after {warmup} warm-up, torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s), malloc {'pinned' if pinned else 'not pinned'}, "
            f"wall {time.perf_counter() - start:.0f} s.",
            "",
            *lines,
            "",
            *DTME_BASES_SECTION,
            *base_lines,
        ]
    )


NEW_SECTIONS = {
    "dtme": DTME_SECTION[0],
    "small": "## Small models: the wrapper's fixed cost",
    "solvers": "## Solvers at many tasks",
    "gramian": "## The Gramian engine: G without J",
    "memory": "## Memory of a step",
}
"""Sections ``--sections`` can run alone, by the heading they write in docs/perf.md."""


def run_sections(
    names: list[str], out: Path, quick: bool, command: str, write_docs: bool, progress=print
) -> str:
    """Only the named sections (``mtlopt-bench run perf --sections small,solvers``): printed,
    written to ``OUT/perf/sections.md`` and, on a full run from a checkout, replaced in place in
    docs/perf.md (appended where the page does not have them yet)."""
    from . import perf_gramian, perf_small, perf_solvers

    unknown = sorted(set(names) - set(NEW_SECTIONS))
    if unknown:
        raise SystemExit(f"unknown perf sections {unknown}: choose among {sorted(NEW_SECTIONS)}")
    pinned = allocator.pin()
    torch.manual_seed(0)
    bodies = {}
    for name in names:
        start = time.perf_counter()
        runners = {
            "dtme": lambda: run_dtme(quick, progress).split("\n"),
            "small": lambda: perf_small.run_small(quick, progress),
            "solvers": lambda: perf_solvers.run_solvers(quick, progress),
            "gramian": lambda: perf_gramian.run_gramian(quick, progress),
            "memory": lambda: perf_gramian.run_memory(quick, progress),
        }
        lines = runners[name]()
        wall = time.perf_counter() - start
        lines.insert(
            2,
            f"Command: `{command}` ({'quick, ' if quick else ''}torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s), CPU, malloc "
            f"{'pinned' if pinned else 'not pinned'}; this section's wall time {wall:.0f} s).\n",
        )
        bodies[name] = "\n".join(lines)
    text = "\n".join(bodies.values())
    target = out / "perf"
    target.mkdir(parents=True, exist_ok=True)
    (target / "sections.md").write_text(text)
    if write_docs:
        page = Path("docs/perf.md")
        doc = page.read_text()
        for name, body in bodies.items():
            doc = replace_section(doc, NEW_SECTIONS[name], body)
        page.write_text(doc)
    return text


def replace_section(doc: str, heading: str, body: str) -> str:
    """``doc`` with the level-2 section under ``heading`` replaced by ``body`` (which starts with
    that heading), or ``body`` appended."""
    start = doc.find(heading + "\n")
    if start < 0:
        return doc.rstrip("\n") + "\n\n" + body.rstrip("\n") + "\n"
    following = doc.find("\n## ", start + len(heading))
    end = len(doc) if following < 0 else following + 1
    return doc[:start] + body.rstrip("\n") + "\n" + ("\n" if following >= 0 else "") + doc[end:]


def run(out: Path, quick: bool, command: str, write_docs: bool, progress=print) -> str:
    from . import perf_gramian, perf_small, perf_solvers

    torch.manual_seed(0)
    if quick:
        floor_cells = [("multifashion", 2), ("qm9", 11)]
        peer_cells = [("qm9", 11)]
        mode_cells = [("qm9", 11)]
        rounds, warmup = 3, 1
    else:
        floor_cells = [(k, t) for k in ("qm9", "multifashion") for t in (2, 5, 11)]
        peer_cells = [("multifashion", 2), ("qm9", 5), ("qm9", 11)]
        mode_cells = [("multifashion", 2), ("qm9", 11)]
        rounds, warmup = 9, 1
    pinned = allocator.pin()
    start = time.perf_counter()
    floor_lines, medians, own_lines = floor_table(floor_cells, rounds, warmup, progress)
    peer_lines = peer_table(peer_cells, rounds, warmup, progress)
    mode_lines = modes_table(mode_cells, rounds, warmup, progress)
    dtme_lines, dtme_base_lines = dtme_table(
        "qm9", [2, 5] if quick else [2, 5, 11], rounds, warmup, progress
    )
    vjp_lines = vjp_table(floor_cells, max(3, rounds // 3), 1, progress)
    solver_lines = solver_table("qm9", 11, medians["qm9", 11], repeats=rounds * 3)
    small_lines = perf_small.run_small(quick, progress)
    solvers_lines = perf_solvers.run_solvers(quick, progress)
    gramian_lines = perf_gramian.run_gramian(quick, progress)
    memory_lines = perf_gramian.run_memory(quick, progress)
    allocator_lines = (
        ["Full run only (`mtlopt-bench run perf`)."]
        if quick
        else allocator.table("qm9", 2, "pcgrad", repeats=4, rounds=rounds, progress=progress)
    )
    wall = time.perf_counter() - start
    threads = torch.get_num_threads()
    smoke = [SMOKE.format(rounds=rounds, cells=len(floor_cells)), ""] if quick else []
    text = "\n".join(
        [
            "# Performance: step-time ratios",
            "",
            *smoke,
            f"Command: `{command}` ({'quick: ' if quick else ''}{rounds} timed rounds after "
            f"{warmup} warm-up; medians of per-round ratios, each contender timed right after its "
            f"reference; torch {torch.__version__}, {threads} thread(s), CPU; "
            f"wall time {wall:.0f} s). Generated by `benchmarks/perf.py`; bold marks a ratio "
            "above its target. glibc's malloc thresholds "
            + ("pinned" if pinned else "not pinned (not glibc)")
            + " for the whole run (see the last section).",
            "",
            "QM9 model: set transformer dim 64, depth 4, batch 64 (29 atom slots, 18 used). "
            "MultiFashion model: ViT dim 64, depth 4, patch 6, batch 128. T task heads, random "
            "inputs.",
            "",
            "## Floor ratio (target ≤ 1.10)",
            "",
            "Wrapper step over the bare floor (one forward, one `autograd.grad` per task, one "
            "Adam step). Defaults, diagnostics on.",
            "",
            *floor_lines,
            "",
            "### The wrapper's own work",
            "",
            "The floor ratio of a ~100 ms step moves by several percent from round to round on "
            "this machine (a second floor timed against the first gave 0.98–1.01 in four runs). "
            "The wrapper's own work is measured directly instead: the time of `opt.step(losses)` less its "
            "`autograd.grad` calls and the inner Adam step, which the floor does too (the "
            "Jacobian's assembly, the finiteness checks, the Gramian, the solver, `wᵀJ`, writing "
            "`.grad`, the diagnostics). Medians over the timed steps of each strategy.",
            "",
            *own_lines,
            "",
            "## Peer ratio against LibMTL 1.1.5 (target ≤ 0.7)",
            "",
            "Ours / LibMTL: our step over LibMTL's step, same model and batch, both with Adam. "
            "LibMTL / floor: LibMTL's step over the floor of its kind of method, the T-backward "
            "floor above for a gradient method, plain training (one backward of the summed "
            "losses) for a loss weighting. A ratio ours / LibMTL of 0.7 needs our step at 0.7 × "
            "LibMTL / floor times the floor: where LibMTL already runs at the floor (ratio near "
            "1) that is fewer backward passes than the method's definition needs (T per-task "
            "gradients, or one backward for a loss weighting), which no exact implementation can "
            "do. LibMTL's GradDrop only runs in representation mode and its CAGrad only with 3 "
            "tasks.",
            "",
            *peer_lines,
            "",
            "## Representation and token modes over EW (target ≤ 1.3)",
            "",
            "Representation mode takes T cheap backward passes through the heads and one "
            "through the trunk. DTME's analysis phase takes one backward per task to the block "
            "inputs (the method's token gradients, the paper's §2.1) besides the training "
            "step's own backward (at T = 2, three backward passes against the floor's two), and "
            "ends after "
            "`analysis_steps`; after the expansion, every block from the first modified one on "
            "runs one stream per task (§3.2), so its forward and backward grow with T by "
            "construction: the paper's own cost model, not overhead of ours. Over the T-backward "
            "floor the analysis phase can cost less than 1 at large T: its T token-gradient "
            "passes stop at the block inputs and compute no weight gradients.",
            "",
            *mode_lines,
            "",
            *DTME_SECTION,
            *dtme_lines,
            "",
            *DTME_BASES_SECTION,
            *dtme_base_lines,
            "",
            "## Batched VJP against sequential per-task gradients",
            "",
            "The T×P matrix of shared gradients (forward included), with one `autograd.grad` per "
            "task (the engine's path) or one batched VJP over the T cotangents "
            "(`is_grads_batched=True`, vmap). Where batching is slower the engine keeps the "
            "sequential path. The two times are medians of each column, the ratio the median of "
            "per-round ratios: on a quiet machine they agree; when other processes interfere "
            "in some rounds they need not (the times' ratio can even fall on the other side of "
            "1), and the cell then shows the range of the per-round ratios.",
            "",
            *vjp_lines,
            "",
            "## Solver share at T = 11 (target < 5 %)",
            "",
            "Median time of `combine` (Gramian, solver, `wᵀJ`) on a captured 11×P matrix, and of "
            "the solver alone (`weigh` on the 11×11 Gramian), over the strategy's median step "
            "from the floor table.",
            "",
            *solver_lines,
            "",
            *small_lines,
            *solvers_lines,
            *gramian_lines,
            *memory_lines,
            "## The C allocator",
            "",
            "glibc adapts its `mmap` threshold to the block sizes a process frees and gives the "
            "top of its heap back past a trim threshold, so a step's large transient blocks may "
            "be mapped and page-faulted anew every step, depending on the process's history: the "
            "cost lands mostly in autograd's backward and grows with what a step holds at its "
            "peak (in one run the wrapper's qm9 T=2 steps took 3,500 more page faults than the "
            "floor's and spent 7–10 ms more in `autograd.grad`). The tables above are taken with "
            "both thresholds pinned (`mallopt`, as `MALLOC_MMAP_THRESHOLD_=1073741824 "
            "MALLOC_TRIM_THRESHOLD_=2147483648` would at start-up) so that they do not depend on "
            "that history. Below, subprocesses started with and without those two variables "
            "(alternating order, qm9 T=2). The two exports are a deployment choice for CPU "
            "training on glibc, with or without mtlopt; the library does not change them.",
            "",
            *allocator_lines,
            "",
        ]
    )
    target = out / "perf"
    target.mkdir(parents=True, exist_ok=True)
    (target / "results.md").write_text(text)
    if write_docs:
        Path("docs/perf.md").write_text(text)
    return text


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtme", action="store_true", help="only DTME's section")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if not args.dtme:
        parser.error("use `mtlopt-bench run perf` for the whole page; --dtme for DTME's section")
    print(run_dtme(args.quick))
