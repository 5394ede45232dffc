"""The small-model section of ``mtlopt-bench run perf``: the wrapper's fixed cost per step.

On a benchmark transformer the step is 70–700 ms and the wrapper's own work a few percent of it;
on a small model (a recommender's shared-bottom MLP, a toy problem) the same work is a larger share.
Three tables:

1. every gradient strategy over the T-backward floor on an MLP (trunk 3 × [Linear(512, 512),
   GELU], T heads Linear(512, 1), batch 256, SGD) at T = 2, 5, 11;
2. every loss strategy over plain training (``sum(losses).backward()``) on the same MLP;
3. the wrapper's overhead per step in microseconds on a tiny MLP (16 wide, batch 32), where the
   step is almost nothing but that overhead.

All three are paired (:func:`mtlopt_bench.perf.paired`): each round times the reference step and
the wrapper's step back to back, in alternating order.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
from torch import nn

import mtlopt

from .perf import Bench, _cell, _split, floor_step, gradient_methods, paired, plain_step


class MLP(nn.Module):
    """A shared-bottom MLP with one scalar head per task."""

    def __init__(self, tasks: int, width: int = 512, depth: int = 3, inputs: int = 512) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(inputs if i == 0 else width, width), nn.GELU()]
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(tasks))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def decode(self, z: torch.Tensor) -> list[torch.Tensor]:
        return [head(z).squeeze(-1) for head in self.heads]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.decode(self.encode(x))


def mlp_bench(tasks: int, width: int = 512, batch: int = 256) -> Bench:
    torch.manual_seed(0)
    model = MLP(tasks, width, inputs=width)
    x, y = torch.randn(batch, width), torch.randn(batch, tasks)

    def heads_loss(outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [((o - y[:, i]) ** 2).mean() for i, o in enumerate(outputs)]

    def losses(m: nn.Module) -> list[torch.Tensor]:
        return heads_loss(m(x))

    def features(m: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = m.encode(x)
        return z, heads_loss(m.decode(z))

    return Bench(model, losses, features, *_split(model))


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=1e-4)


def floor(b: Bench) -> Callable[[], None]:
    """The T-backward floor with the SGD step this section uses (:func:`perf.floor_step`)."""
    return floor_step(b, _sgd)


def plain(b: Bench) -> Callable[[], None]:
    """Plain training with SGD (:func:`perf.plain_step`)."""
    return plain_step(b, _sgd)


def wrapper(b: Bench, method: str) -> Callable[[], None]:
    opt = mtlopt.MTLOptimizer(_sgd(b.model), mtlopt.create(method, num_tasks=len(b.heads)))

    def step() -> None:
        opt.zero_grad()
        opt.step(b.losses(b.model))

    return step


def loss_methods() -> list[str]:
    """Loss strategies stepped with ``step(losses)`` (those that need a validation signal are
    left to the suite, as in :func:`~mtlopt_bench.perf.gradient_methods`)."""
    return [
        n
        for n in mtlopt.available()
        if mtlopt.info(n).kind.value == "loss" and not mtlopt.info(n).hooks
    ]


def small_tables(
    tasks: list[int], rounds: int, warmup: int, progress, methods: list[str] | None = None
) -> tuple[list[str], list[str], list[str]]:
    """The three tables (gradient strategies over the floor, loss strategies over plain
    training, microseconds of overhead on the tiny model)."""
    gradient = [m for m in gradient_methods() if methods is None or m in methods]
    loss = [m for m in loss_methods() if methods is None or m in methods]
    floor_ratios: dict[int, dict] = {}
    plain_ratios: dict[int, dict] = {}
    for t in tasks:
        base = mlp_bench(t)
        floor_ratios[t] = {}
        for m in gradient:  # one pair of models alive at a time, as in the floor table
            pair = (floor(base.clone()), wrapper(base.clone(), m))
            floor_ratios[t] |= paired({m: pair}, rounds, warmup)
        plain_ratios[t] = {}
        for m in loss:
            pair = (plain(base.clone()), wrapper(base.clone(), m))
            plain_ratios[t] |= paired({m: pair}, rounds, warmup)
        progress(f"small model T={t}")

    def table(ratios: dict[int, dict], names: list[str], reference: str) -> list[str]:
        lines = [
            "| strategy | " + " | ".join(f"T={t}" for t in tasks) + " |",
            "|---|" + "---|" * len(tasks),
            f"| {reference} (ms) | "
            + " | ".join(
                f"{1e3 * statistics.median(r.reference_seconds for r in ratios[t].values()):.1f}"
                for t in tasks
            )
            + " |",
        ]
        for m in names:
            lines.append(f"| {m} | " + " | ".join(_cell(ratios[t][m], 1.05) for t in tasks) + " |")
        return lines

    tiny = tiny_overhead(tasks, [*gradient, *loss], max(3 * rounds, 15), warmup)
    return table(floor_ratios, gradient, "floor step"), table(plain_ratios, loss, "plain step"), tiny


def vjp_lines(tasks: list[int], rounds: int, warmup: int) -> list[str]:
    """The MLP's T×P shared gradients (forward included): one ``autograd.grad`` per task against
    one batched VJP over the T cotangents (``is_grads_batched=True``, vmap)."""
    lines = [
        "| MLP | sequential (ms), median | batched (ms), median | batched / sequential |",
        "|---|---|---|---|",
    ]
    for t in tasks:
        b = mlp_bench(t)

        def sequential(b=b, t=t):
            losses = b.losses(b.model)
            for i, loss in enumerate(losses):
                torch.autograd.grad(loss, b.shared, retain_graph=i < t - 1)

        def batched(b=b, t=t):
            losses = torch.stack(b.losses(b.model))
            torch.autograd.grad(losses, b.shared, grad_outputs=torch.eye(t), is_grads_batched=True)

        r = paired({"batched": (sequential, batched)}, rounds, warmup)["batched"]
        lines.append(
            f"| T={t} | {1e3 * r.reference_seconds:.1f} | {1e3 * r.seconds:.1f} | {_cell(r)} |"
        )
    return lines


def tiny_overhead(tasks: list[int], methods: list[str], rounds: int, warmup: int) -> list[str]:
    """Median over rounds of (wrapper step − its reference step) in µs on a 16-wide MLP, batch 32:
    the reference is the T-backward floor for a gradient strategy, plain training for a loss
    strategy."""
    gradient = set(gradient_methods())
    lines = [
        "| strategy | " + " | ".join(f"T={t}: µs over the reference" for t in tasks) + " |",
        "|---|" + "---|" * len(tasks),
    ]
    cells: dict[tuple[str, int], float] = {}
    references: dict[int, list[float]] = {t: [] for t in tasks}
    for t in tasks:
        base = mlp_bench(t, width=16, batch=32)
        for m in methods:
            reference = floor(base.clone()) if m in gradient else plain(base.clone())
            step = wrapper(base.clone(), m)
            measured = paired({m: (reference, step)}, rounds, warmup)[m].rounds
            differences = [own_s - ref_s for own_s, ref_s in measured]
            if m in gradient:
                references[t].extend(ref_s for _, ref_s in measured)
            cells[m, t] = statistics.median(differences)
    lines.append(
        "| T-backward floor step (µs) | "
        + " | ".join(f"{1e6 * statistics.median(references[t]):.0f}" for t in tasks)
        + " |"
    )
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(f"{1e6 * cells[m, t]:.0f}" for t in tasks) + " |")
    return lines


SMALL_SECTION = [
    "## Small models: the wrapper's fixed cost",
    "",
    "MLP: trunk 3 × [Linear(512, 512), GELU] (790 k shared parameters), T heads Linear(512, 1), "
    "batch 256, SGD, random inputs. Gradient strategies over the T-backward floor (one forward, one "
    "`autograd.grad` per task, one SGD step; target ≤ 1.05), loss strategies over plain training "
    "(one backward of the summed losses; target ≤ 1.05). Defaults, diagnostics on. The wrapper "
    "forms G = J Jᵀ once per step (on the host block by block: MKL's single product is slow at "
    "some T) and reads the finiteness check from its diagonal, writes J into the same memory "
    "every step (a fresh 35 MB block at T = 11 is mapped and page-faulted anew each step under "
    "glibc's default thresholds), and GradDrop and DB-MTL combine without T×P temporaries. "
    "The default `engine=\"auto\"`: on this MLP the Gramian engine takes the Gramian "
    "strategies' steps at T = 5 and 11 (its operation count is lower there), the Jacobian path at "
    "T = 2 and for every other strategy (the next section compares the two paths). A loss "
    "strategy's first micro-batch lets autograd write `.grad` itself, as plain `backward` does "
    "(no copy of the gradients; no `inputs=` either where the losses reach only the optimizer's "
    "parameters), and a Gramian strategy's update wᵀJ becomes `.grad` without a copy.",
    "",
    "Where the target is out of reach, and why: at T = 2 a Jacobian-path step moves about "
    "(T + 4)·P more floats through memory than the floor (J written from autograd's outputs, "
    "read for G and again for wᵀJ, the update written; the floor only adds T − 1 gradients "
    "into `.grad`), 6 × 790 k floats or 19 MB per step here: a fixed cost of forming J at "
    "small T. Forming G and wᵀJ from the per-parameter gradients instead of J (one fused "
    "update, T(T + 1)/2 dot products per parameter) measured 4 % less time for that part at "
    "T = 2 (1.54 against 1.61 ms) and 34 % more at T = 5: not taken. The Gramian engine forms "
    "no J but costs more than it saves at T = 2 (next "
    "section); from T = 5 its steps come within a few % of the floor, at T = 11 at or below it. "
    "For the loss strategies a profile of one step puts most of the rest in the finiteness "
    "check of the gradients (one reduction over P) and Python bookkeeping (the tiny model's "
    "table below).",
    "",
]
TINY_SECTION = [
    "### Overhead per step on a tiny model",
    "",
    "The same MLP 16 wide, batch 32: the step is almost only the wrapper's own work (Python "
    "bookkeeping, the checks, the solver). Median over rounds of the wrapper's step less its "
    "reference step (the T-backward floor for a gradient strategy, plain training for a loss "
    "strategy), in microseconds.",
    "",
]


VJP_SECTION = [
    "### Batched VJP on the MLP",
    "",
    "The MLP's T×P matrix of shared gradients (forward included), one `autograd.grad` per task "
    "(the engine's path) against one batched VJP over the T cotangents "
    "(`is_grads_batched=True`), as in the benchmark models' table above; with the thread count "
    "of the run.",
    "",
]


def run_small(quick: bool, progress=print) -> list[str]:
    rounds, warmup = (3, 1) if quick else (9, 1)
    tasks = [2, 11] if quick else [2, 5, 11]
    gradient, loss, tiny = small_tables(tasks, rounds, warmup, progress)
    vjp = vjp_lines(tasks, max(3, rounds // 3), 1)
    return [
        *SMALL_SECTION,
        *gradient,
        "",
        *loss,
        "",
        *TINY_SECTION,
        *tiny,
        "",
        *VJP_SECTION,
        *vjp,
        "",
    ]
