"""The many-task section of ``mtlopt-bench run perf``: each Gramian strategy's solver against T.

The solver (``weigh_at_precision`` on the T×T Gramian, float64 on the host) is timed alone, on
the Gramian of a random Gaussian T × 2T matrix (gradients in general position, about half of the
pairs conflicting: the hard case for the projection solvers). A cell whose T³ extrapolation from the
previous one passes the time cap is not run; it shows the extrapolation.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

import mtlopt
from mtlopt.strategies.base import GramianStrategy, gramian_rounding

TARGET_SECONDS = 1.0


def gramian_methods() -> list[str]:
    names = [n for n in mtlopt.available() if mtlopt.info(n).kind.value == "gradient"]
    return [n for n in names if isinstance(mtlopt.create(n, num_tasks=2), GramianStrategy)]


SPREAD = 3.0
"""Norm spread of the second table: task gradient norms ``e^u``, ``u ~ U(−3, 3)`` (400× apart)."""


def solver_seconds(method: str, tasks: int, seed: int = 0, spread: float = 0.0) -> float:
    rng = np.random.default_rng(seed)
    jacobian = rng.standard_normal((tasks, 2 * tasks))
    if spread:
        jacobian *= np.exp(rng.uniform(-spread, spread, (tasks, 1)))
    gramian, losses = jacobian @ jacobian.T, rng.uniform(0.5, 2.0, tasks)
    strategy = mtlopt.create(method, num_tasks=tasks)
    assert isinstance(strategy, GramianStrategy)
    rounding = gramian_rounding(torch.float32, tasks, 2 * tasks)
    start = time.perf_counter()
    strategy.weigh_at_precision(gramian, losses, rounding)
    return time.perf_counter() - start


def solver_scaling_table(tasks: list[int], cap: float, progress) -> list[str]:
    """One row per Gramian strategy: its solver's seconds at each T with torch's current thread
    count, then at the largest T again with every core (the solvers' large products run on
    torch's kernels: :func:`mtlopt.solvers.matmul`)."""
    cores = os.cpu_count() or 1
    lines = [
        "| strategy | "
        + " | ".join(f"T={t} (s)" for t in tasks)
        + f" | T={tasks[-1]}, {cores} threads (s) |",
        "|---|" + "---|" * (len(tasks) + 1),
    ]
    for m in gramian_methods():
        cells: list[str] = []
        last: tuple[int, float] | None = None
        for t in tasks:
            if last is not None and last[1] * (t / last[0]) ** 3 > cap:
                # Not run: a T³ extrapolation from the last cell passes the cap.
                cells.append(f"**> {cap:.0f}** (T³ extrapolation: {last[1] * (t / last[0]) ** 3:.0f})")
                last = (t, last[1] * (t / last[0]) ** 3)
                continue
            seconds = solver_seconds(m, t)
            cells.append(_cell(seconds))
            last = (t, seconds)
        ran_largest = not cells[-1].startswith("**>")
        cells.append(_cell(_with_threads(cores, m, tasks[-1])) if ran_largest else "not run")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
        progress(f"solvers {m}")
    return lines


def spread_norms_table(tasks: int, progress) -> list[str]:
    """Each Gramian strategy's solver at ``tasks`` on gradients of equal norms (the table above)
    against gradients whose norms are 400× apart, with torch's current thread count."""
    lines = [
        f"| strategy | T={tasks}, equal norms (s) | T={tasks}, norms 400× apart (s) |",
        "|---|---|---|",
    ]
    for m in gramian_methods():
        equal, spread = solver_seconds(m, tasks), solver_seconds(m, tasks, spread=SPREAD)
        lines.append(f"| {m} | {_cell(equal)} | {_cell(spread)} |")
        progress(f"solvers {m}, spread norms")
    return lines


def _cell(seconds: float) -> str:
    text = f"{seconds:.3f}" if seconds < 10 else f"{seconds:.0f}"
    return text if seconds <= TARGET_SECONDS else f"**{text}**"


def _with_threads(threads: int, method: str, tasks: int) -> float:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return solver_seconds(method, tasks)
    finally:
        torch.set_num_threads(before)


SOLVERS_SECTION = [
    "## Solvers at many tasks",
    "",
    "Each Gramian strategy's solver alone (its weights from the T×T Gramian, float64 on the host, "
    "one call, first step: no warm start) on the Gramian of a random Gaussian T × 2T matrix. "
    "Target: ≤ 1 s at T = 1000; bold above it. A cell whose T³ extrapolation from the previous "
    "one passes the time cap is not run and shows that extrapolation. The last column repeats "
    "the largest T with torch using every core of the machine: the solvers' large T×T "
    "products (from about 300³ multiply-adds) run on torch's kernels, the rest of their work "
    "on one thread.",
    "",
    "How the solvers that were cubic or worse in T scale: UPGrad's T projections onto the dual "
    "cone share the Gramian and run together, a float32 accelerated projected gradient warm "
    "start then a batched active-set conjugate-gradient method, one T×T matrix product per "
    "iteration for all rows (Lawson–Hanson only for a row that misses its KKT conditions); "
    "MGDA's min-norm point, CAGrad's dual and PCD's dual are solved on their support by a "
    "primal-dual active-set method, a few Cholesky factorisations (Wolfe, SLSQP and "
    "Lawson–Hanson only where that does not apply); PCGrad and GradVac run their visiting "
    "sequences in blocks of about 2√T rounds, one T×T matrix product per block. Each is tested "
    "against its previous solver or the paper's sequential loop.",
    "",
]

SPREAD_SECTION = [
    "Task gradients rarely share a norm. The second table runs each solver again at the largest "
    "T on a Gramian whose task gradients' norms are e^u, u uniform on [−3, 3] (about 400× "
    "apart), with the thread count of the first columns. UPGrad's and DualProj's projections "
    "solve in the normalised variables D v with D = diag(√G_jj) (Jacobi preconditioning, an "
    "exact change of variables): without it this case took 3–5× the time of the equal-norm "
    "one, and without a ridge its batched "
    "solver missed most rows and handed them to Lawson–Hanson one at a time.",
    "",
]


def run_solvers(quick: bool, progress=print) -> list[str]:
    tasks = [10, 100] if quick else [10, 100, 300, 1000]
    cap = 2.0 if quick else 30.0
    return [
        *SOLVERS_SECTION,
        *solver_scaling_table(tasks, cap, progress),
        "",
        *SPREAD_SECTION,
        *spread_norms_table(tasks[-1], progress),
        "",
    ]
