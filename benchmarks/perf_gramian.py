"""The Gramian engine's sections of ``mtlopt-bench run perf``: its step time and its memory.

1. **Speed** (``--sections gramian``): a Gramian strategy's step through the Jacobian path
   (``engine="jacobian"``: ``J``, then ``G = J Jᵀ``, then ``wᵀ J``) and through the Gramian engine
   (:mod:`mtlopt.autogram`), each over the T-backward floor in the same rounds, on the
   small-model MLP (:mod:`mtlopt_bench.perf_small`), the benchmark ViT and QM9's set transformer
   at T = 2, 5, 11. The share of the shared parameters the engine takes is reported: the rest
   (LayerNorm, embeddings, biases added outside a product) keeps its columns of ``J``.
2. **Memory** (``--sections memory``): the peak resident memory of a step above the memory after
   the model is built, each configuration in a fresh subprocess, for the Jacobian path, the engine
   and representation mode, on MLPs of P shared parameters and T tasks.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

import mtlopt
from mtlopt.autogram import AUTO_MARGIN, find_layers, operation_ratio
from mtlopt.partition import Partition

from .perf import Bench, _cell, _split, bench, floor_step, paired, vjp_table
from .perf_small import mlp_bench

ENGINE_METHODS = ["mgda", "upgrad"]
MODELS = ["mlp", "multifashion", "qm9"]
LABELS = {"mlp": "MLP", "multifashion": "ViT", "qm9": "set transformer"}


def _inner(kind: str) -> Callable[[nn.Module], torch.optim.Optimizer]:
    if kind == "mlp":  # the small-model section's SGD
        return lambda m: torch.optim.SGD(m.parameters(), lr=1e-4)
    return lambda m: torch.optim.Adam(m.parameters(), lr=1e-4)


def _bench(kind: str, tasks: int) -> Bench:
    return mlp_bench(tasks) if kind == "mlp" else bench(kind, tasks)


def engine_step(b: Bench, kind: str, method: str, engine: str) -> Callable[[], None]:
    opt = mtlopt.MTLOptimizer(
        _inner(kind)(b.model), mtlopt.create(method, num_tasks=len(b.heads)), engine=engine
    )

    def step() -> None:
        opt.zero_grad()
        info = opt.step(b.losses(b.model))
        assert info is not None and info.engine == engine, (info and info.engine, engine)

    return step


def engine_share(b: Bench) -> tuple[float, float]:
    """The share of the shared parameters the engine finds in the graph as ``x Wᵀ (+ b)``, and
    its operation count on them over the Jacobian path's (``engine="auto"`` takes the engine
    below 0.9)."""
    losses = b.losses(b.model)
    partition = Partition(shared=list(b.shared), specific=[list(h) for h in b.heads])
    layers = find_layers(losses, partition)
    covered = sum(
        p.numel() for found in layers for p in (found[0].weight, found[0].bias) if p is not None
    )
    return covered / sum(p.numel() for p in b.shared), operation_ratio(layers, len(losses))


def engine_against_j(
    base: Bench, kind: str, method: str, rounds: int, warmup: int
) -> tuple[float, str, str, float]:
    """One strategy's step through both paths, each over the floor in the same rounds: the
    floor (ms), the two cells and the median per-round ratio engine / J path."""
    pairs = {
        engine: (
            floor_step(base.clone(), _inner(kind)),
            engine_step(base.clone(), kind, method, engine),
        )
        for engine in ("jacobian", "gramian")
    }
    result = paired(pairs, rounds, warmup)
    jac, gram = result["jacobian"], result["gramian"]
    floor_ms = 1e3 * statistics.median([jac.reference_seconds, gram.reference_seconds])
    direct = [
        own_g / own_j for (own_g, _), (own_j, _) in zip(gram.rounds, jac.rounds, strict=True)
    ]
    return floor_ms, _cell(jac), _cell(gram), statistics.median(direct)


def speed_table(tasks: list[int], rounds: int, warmup: int, progress) -> list[str]:
    lines = [
        "| model | T | floor (ms) | engine's share of P | operations, engine / J path | "
        "auto takes | strategy | J path / floor | engine / floor | engine / J path |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in MODELS:
        for t in tasks:
            base = _bench(kind, t)
            share, ops = engine_share(base)
            for method in ENGINE_METHODS:
                floor_ms, jac, gram, direct = engine_against_j(base, kind, method, rounds, warmup)
                lines.append(
                    f"| {LABELS[kind]} | {t} | {floor_ms:.1f} | {share:.0%} | {ops:.2f} | "
                    f"{'engine' if ops < AUTO_MARGIN else 'J path'} | {method} | "
                    f"{jac} | {gram} | {direct:.2f} |"
                )
            progress(f"gramian engine {kind} T={t}")
    return lines


class Encoder(nn.Module):
    """``nn.TransformerEncoder`` with PyTorch's defaults (8 heads, feed-forward 2048, dropout
    0.1, post-norm), mean-pooled, one scalar head per task."""

    def __init__(self, tasks: int, width: int = 512, depth: int = 2) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(width, nhead=8, batch_first=True)
        self.trunk = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(tasks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.trunk(x).mean(dim=1)
        return [head(z).squeeze(-1) for head in self.heads]


def encoder_bench(tasks: int, batch: int, sequence: int, width: int = 512) -> Bench:
    torch.manual_seed(0)
    model = Encoder(tasks, width)
    x, y = torch.randn(batch, sequence, width), torch.randn(batch, tasks)

    def losses(m: nn.Module) -> list[torch.Tensor]:
        return [((o - y[:, i]) ** 2).mean() for i, o in enumerate(m(x))]

    def features(m: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
        raise NotImplementedError("the crossover table uses no representation mode")

    return Bench(model, losses, features, *_split(model))


def crossover_cases(quick: bool) -> list[tuple[str, int, int, Callable[[int], Bench]]]:
    """``(model, width, rows, bench for T tasks)`` of the crossover table."""
    widths, ratios = ([128], [0.5, 2.0]) if quick else ([128, 512], [0.125, 0.5, 2.0])
    cases: list[tuple[str, int, int, Callable[[int], Bench]]] = [
        ("MLP", w, n, lambda t, w=w, n=n: mlp_bench(t, width=w, batch=n))
        for w in widths
        for n in (round(r * w) for r in ratios)
    ]
    shapes = [(4, 32)] if quick else [(4, 32), (8, 64)]
    cases += [
        (f"TransformerEncoder, batch {b} × sequence {s}", 512, b * s,
         lambda t, b=b, s=s: encoder_bench(t, b, s))
        for b, s in shapes
    ]
    return cases


def crossover_table(
    tasks: int,
    cases: list[tuple[str, int, int, Callable[[int], Bench]]],
    rounds: int,
    warmup: int,
    progress,
) -> list[str]:
    """Where the engine wins: MGDA's step through both paths as the rows N of each product
    (batch × tokens) grow against the layers' width."""
    lines = [
        "| model | width | rows N | N / width | floor (ms) | operations, engine / J path | "
        "auto takes | J path / floor | engine / floor | engine / J path |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, width, rows, make in cases:
        base = make(tasks)
        _, ops = engine_share(base)
        kind = "mlp" if label == "MLP" else "encoder"
        floor_ms, jac, gram, direct = engine_against_j(base, kind, "mgda", rounds, warmup)
        lines.append(
            f"| {label} | {width} | {rows} | {rows / width:g} | {floor_ms:.1f} | {ops:.2f} | "
            f"{'engine' if ops < AUTO_MARGIN else 'J path'} | {jac} | {gram} | {direct:.2f} |"
        )
        progress(f"gramian crossover {label} N={rows}")
    return lines


CROSSOVER_SECTION = [
    "### Where the engine wins: rows against width",
    "",
    "MGDA's step through both paths at T = 11, over the T-backward floor in the same rounds, as "
    "the rows N that each product sees (batch × sequence length for a token model) grow against "
    "the width w: the MLP (trunk 3 × [Linear(w, w), GELU], SGD) and a 2-layer "
    "`nn.TransformerEncoder` with PyTorch's defaults (width 512, 8 heads, feed-forward 2048, "
    "Adam), mean-pooled into the T heads. The operation count "
    "(`mtlopt.autogram.operation_ratio`) predicts the crossover: a layer's block of G costs "
    "about (T + 1)·N²·w through the input kernel and T·N·w² through its weight gradients, so the "
    "kernel, and with it the engine, pays while N is below about w; above, both paths form the "
    "same T weight gradients and the engine can only tie.",
    "",
]


SPEED_SECTION = [
    "## The Gramian engine: G without J",
    "",
    "A Gramian strategy's step through the Jacobian path (`engine=\"jacobian\"`) and through the "
    "Gramian engine (`engine=\"gramian\"`), each over the T-backward floor in the same "
    "interleaved rounds; \"auto\" (the default) takes the engine where its operation count on "
    "the shared products is below 0.9 × the J path's (`mtlopt.autogram.engine_pays`): the "
    "columns say which; engine / J path "
    "is the median of the per-round ratios of the two steps. The engine's share of P: the shared "
    "parameters it finds on the graph as products `x Wᵀ (+ b)` (linear layers, attention's "
    "projections; their Gramian block from the products' inputs and output gradients); the rest "
    "(LayerNorm, embeddings, biases added outside a product) keeps its columns of J. MLP: trunk "
    "3 × [Linear(512, 512), GELU], batch 256, SGD; ViT and set transformer: the models above, "
    "Adam.",
    "",
    "Why the two benchmark transformers stay at the floor: every shared product of the ViT sees "
    "N = 4,608 rows (128 images × 36 tokens), of the set transformer 1,856, against widths "
    "64–192. For every layer the weight-gradient form of its block of G is then the cheaper "
    "(below), so the engine forms the same T weight gradients as the floor's backward passes "
    "and its operation count is above the J path's (the column). Neither exact form does better "
    "on these shapes: ≤ 0.7 × the floor is out of reach on these two models. The next table "
    "shows how far the engine goes where few rows meet wide layers: the weight gradients are "
    "about half of each backward pass through a linear layer, so even a free Gramian leaves "
    "the forward and the T passes to the layers' outputs, about (1 + T) / (1 + 2T) of the floor "
    "(0.52 at T = 11) on an MLP, more where attention's own products count.",
    "",
]


MEMORY_SECTION = [
    "## Memory of a step",
    "",
    "Peak resident memory of the first two steps above the memory once the model and its batch "
    "exist, each configuration in a fresh subprocess (1 thread; MGDA; an MLP trunk of three "
    "square Linear layers holding P shared parameters, batch 64, T heads Linear(w, 1), SGD). "
    "Jacobian path: T×P `J` and one task's gradients; engine: the layers' inputs and T output "
    "gradients per layer, no `J`; representation mode: gradients with respect to the trunk's "
    "output only; `jacobian_rows=4` (Jacobian path, `mtlopt.chunked`): 4 rows of `J` at a time, "
    "each later task's gradient formed again for its column of `G` (T + T²/8 backward passes "
    "instead of T; at T ≤ 4 it is the Jacobian path). Below the table: a least-squares fit of "
    "each path's peak, and the largest T whose step fits 24 GiB.",
    "",
]


def _width(parameters: int) -> int:
    return max(8, round((parameters / 3) ** 0.5))


def memory_child(parameters: int, tasks: int, mode: str) -> dict[str, float]:
    """Run in a subprocess: the peak memory of two steps above the memory before them."""
    torch.manual_seed(0)
    width = _width(parameters)
    trunk = nn.Sequential(*[nn.Linear(width, width) for _ in range(3)])
    heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(tasks))
    model = nn.ModuleDict({"trunk": trunk, "heads": heads})
    x, y = torch.randn(64, width), torch.randn(64, tasks)
    opt = mtlopt.MTLOptimizer(
        torch.optim.SGD(model.parameters(), lr=1e-6), "mgda",
        engine="gramian" if mode == "gramian" else "jacobian",
        jacobian_rows=CHUNK_ROWS if mode == "chunked" else None,
    )
    _reset_peak()
    before = _rss()  # after the reset: the peak since then is at least this
    for _ in range(2):
        opt.zero_grad()
        z = trunk(x)
        losses = [((h(z).squeeze(-1) - y[:, i]) ** 2).mean() for i, h in enumerate(heads)]
        if mode == "representation":
            opt.backward(losses, features=z)
            opt.step()
        else:
            opt.step(losses)
    peak = _peak()
    shared = sum(p.numel() for p in trunk.parameters())
    return {"peak": peak - before, "shared": shared}


def _reset_peak() -> None:
    """Start the process's peak resident memory (VmHWM) afresh: the imports' peak is not the
    step's (Linux: ``clear_refs`` 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_table(sizes: list[int], tasks: list[int], progress) -> list[str]:
    lines = [
        "| P (shared) | T | Jacobian path (MB) | engine (MB) | representation (MB) | "
        f"jacobian_rows={CHUNK_ROWS} (MB) | J alone (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    measured: dict[str, list[tuple[int, int, float]]] = {m: [] for m in MODES}
    for parameters in sizes:
        for t in tasks:
            cells = {}
            shared = 0
            for mode in MODES:
                out = subprocess.run(
                    [sys.executable, "-m", "mtlopt_bench.perf_gramian", str(parameters), str(t),
                     mode],
                    capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                )
                if out.returncode != 0:
                    cells[mode] = f"failed ({out.stderr.strip().splitlines()[-1][:60]})"
                    continue
                result = json.loads(out.stdout.strip().splitlines()[-1])
                cells[mode] = f"{result['peak'] / 1e6:.0f}"
                shared = int(result["shared"])
                measured[mode].append((t, shared, float(result["peak"])))
            lines.append(
                f"| {shared / 1e6:.1f} M | {t} | {cells['jacobian']} | {cells['gramian']} | "
                f"{cells['representation']} | {cells['chunked']} | {4 * t * shared / 1e6:.0f} |"
            )
            progress(f"memory P={parameters} T={t}")
    lines += ["", *fit_lines(measured)]
    return lines


MODES = ("jacobian", "gramian", "representation", "chunked")
CHUNK_ROWS = 4
BUDGET = 24 * 2**30


def fit_lines(measured: dict[str, list[tuple[int, int, float]]]) -> list[str]:
    """Least-squares fits ``peak ≈ a·T·P + b·P + c`` (bytes) per path, and the largest T at
    which a step fits 24 GiB for a few P."""
    lines = []
    for mode, points in measured.items():
        if len(points) < 3:
            continue
        design = np.array([[t * p, p, 1.0] for t, p, _ in points])
        peaks = np.array([peak for *_, peak in points])
        (a, b, c), *_ = np.linalg.lstsq(design, peaks, rcond=None)
        bounds = []
        for p in (10**7, 5 * 10**7, 10**8):
            largest = (BUDGET - b * p - c) / (a * p) if a > 0 else math.inf
            bounds.append(
                f"P = {p / 1e6:.0f} M: T ≤ {largest:.0f}" if math.isfinite(largest) else
                f"P = {p / 1e6:.0f} M: no T bound"
            )
        lines.append(
            f"- {mode}: peak ≈ {a:.2f}·T·P + {b:.2f}·P bytes + {c / 1e6:.0f} MB; 24 GiB holds "
            + ", ".join(bounds)
            + (f" (T·P ≤ {(BUDGET - c) / a:.2g} where the T·P term dominates)" if a > 0.5 else "")
            + "."
        )
    return lines


def batched_vjp_lines(tasks: int, rounds: int, warmup: int, progress) -> list[str]:
    """:func:`mtlopt_bench.perf.vjp_table` on the three models, with 1 and 2 threads."""
    lines = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            table = vjp_table([(k, tasks) for k in MODELS], rounds, warmup, progress, _bench)
            lines += [f"{count} thread{'s' if count > 1 else ''}:", "", *table, ""]
    finally:
        torch.set_num_threads(threads)
    return lines


VJP_SECTION = [
    "### Batched VJP, 1 and 2 threads",
    "",
    "The T×P shared gradients by one `autograd.grad` per task (both paths' way) against one "
    "batched VJP over the T cotangents (`is_grads_batched=True`, vmap), at T = 5, forward "
    "included.",
    "",
]


def run_gramian(quick: bool, progress=print) -> list[str]:
    rounds, warmup = (3, 1) if quick else (9, 1)
    tasks = [2, 11] if quick else [2, 5, 11]
    return [
        *SPEED_SECTION,
        *speed_table(tasks, rounds, warmup, progress),
        "",
        *CROSSOVER_SECTION,
        *crossover_table(11, crossover_cases(quick), max(3, rounds // 2), warmup, progress),
        "",
        *VJP_SECTION,
        *batched_vjp_lines(5, max(3, rounds // 3), 1, progress),
    ]


def run_memory(quick: bool, progress=print) -> list[str]:
    sizes = [1_000_000] if quick else [1_000_000, 10_000_000, 50_000_000]
    tasks = [2, 8] if quick else [2, 8, 32]
    return [*MEMORY_SECTION, *memory_table(sizes, tasks, progress), ""]


if __name__ == "__main__":
    torch.set_num_threads(1)
    size, count, which = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    print(json.dumps(memory_child(size, count, which)))
