"""Aggregates finished runs into results.json / results.csv / results.md and PNG plots."""

from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import mtlopt
from mtlopt.metrics import delta_m

from .paired import NOT_DISTINGUISHABLE, differences, versus_ew
from .problem import Problem
from .suite import single_task

DELTA_NOTE = (
    "Δm (%) is the mean over all metrics of the relative change against single-task models "
    "trained with the same budget, signed so that **lower is better** (Maninis et al.; the "
    "Nash-MTL / FAMO protocol): negative Δm beats the single-task models."
)


VERSUS_KEYS = ("mean", "low", "high", "seeds", "verdict")


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _fmt(mean: float, std: float, digits: int = 4) -> str:
    if mean != mean:  # NaN
        return "–"
    return f"{mean:.{digits}g} ± {std:.2g}" if std else f"{mean:.{digits}g}"


def aggregate(problem: Problem, runs: list[dict]) -> list[dict[str, Any]]:
    """One row per (variant, method): metric means and stds, Δm, step time relative to EW."""
    by_variant: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        by_variant[str(run["variant"])].append(run)
    rows = []
    for variant, group in by_variant.items():
        ok = [r for r in group if "error" not in r]
        baselines = _baselines(problem, ok)
        ew_time = {r["seed"]: r["median_step_seconds"] for r in ok if r["method"] == "ew"}
        methods = sorted({r["method"] for r in group if single_task(r["method"]) is None})
        for method in methods:
            mine = [r for r in group if r["method"] == method]
            done = [r for r in mine if "error" not in r]
            row: dict[str, Any] = {"variant": variant, "method": method, "runs": len(done)}
            if not done:
                row["error"] = mine[0]["error"] if mine else "not run"
                rows.append(row)
                continue
            for metric in problem.metrics:
                row[metric] = _mean_std([r["metrics"][metric] for r in done])
            if baselines is not None:
                directions = {m: problem.metrics[m] for m in baselines}
                row["delta_m"] = _mean_std(
                    [
                        delta_m({m: r["metrics"][m] for m in baselines}, baselines, directions)
                        for r in done
                    ]
                )
            ratios = [
                r["median_step_seconds"] / ew_time[r["seed"]] for r in done if r["seed"] in ew_time
            ]
            row["time_vs_ew"] = _mean_std(ratios)
            if method != "ew":
                versus = versus_ew(differences(problem, ok, method, variant))
                if versus is not None:
                    row["vs_ew"] = {**versus.__dict__, "verdict": versus.verdict}
            row["step_ms"] = _mean_std([1e3 * r["median_step_seconds"] for r in done])
            memory = [
                r["peak_rss_growth_mb"] for r in done if r.get("peak_rss_growth_mb") is not None
            ]
            row["memory_mb"] = _mean_std(memory)
            rows.append(row)
    return rows


def _baselines(problem: Problem, runs: list[dict]) -> dict[str, float] | None:
    if not problem.single_task_baselines:
        return None
    values: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        if single_task(run["method"]) is not None:
            for metric, value in run["metrics"].items():
                values[metric].append(value)
    if set(values) != set(problem.metrics):
        return None
    return {m: statistics.fmean(v) for m, v in values.items()}


def smoke_banner(runs: list[dict]) -> str | None:
    """The line that marks a quick run's tables as a smoke run, or None for a full run."""
    if not any(r.get("quick") for r in runs):
        return None
    steps = sorted({r["steps"] for r in runs if "steps" in r})
    seeds = len({r["seed"] for r in runs if "seed" in r})
    return (
        f"**Smoke run** (quick: {'/'.join(map(str, steps))} steps, {seeds} seed"
        f"{'s' if seeds != 1 else ''}): it checks that every method runs end to end; its numbers "
        "are not measurements. Full runs and measured tables: docs/benchmarks.md."
    )


def write(problem: Problem, runs: list[dict], out: Path, command: str) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    rows = aggregate(problem, runs)
    (out / "results.json").write_text(
        json.dumps(
            {
                "problem": problem.name,
                "description": problem.description,
                "command": command,
                "rows": rows,
                "runs": runs,
            },
            indent=1,
            default=str,
        )
    )
    columns = [
        "variant",
        "method",
        "runs",
        *problem.metrics,
        "delta_m",
        "time_vs_ew",
        "step_ms",
        "memory_mb",
        "error",
    ]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                c
                for col in columns
                for c in (
                    (col,)
                    if col in ("variant", "method", "runs", "error")
                    else (f"{col}_mean", f"{col}_std")
                )
            ]
            + [f"vs_ew_{k}" for k in VERSUS_KEYS]
        )
        for row in rows:
            line = []
            for col in columns:
                value = row.get(col)
                if col in ("variant", "method", "runs", "error"):
                    line.append("" if value is None else value)
                else:
                    line.extend(value if isinstance(value, tuple) else ("", ""))
            versus = row.get("vs_ew", {})
            writer.writerow(line + [versus.get(k, "") for k in VERSUS_KEYS])
    (out / "results.md").write_text(markdown(problem, rows, command, smoke_banner(runs)))
    plots(problem, runs, rows, out)
    return rows


def markdown(problem: Problem, rows: list[dict], command: str, banner: str | None = None) -> str:
    lines = [f"## {problem.name}", ""]
    lines += [banner, ""] if banner else []
    lines += [problem.description, "", f"Command: `{command}`", ""]
    has_delta = any("delta_m" in r for r in rows)
    if has_delta:
        lines += [DELTA_NOTE, ""]
    if problem.notes:
        lines += [problem.notes, ""]
    lines += [
        "Step time relative to EW: median step of the method over median step of EW, same "
        "seed and variant, in this run. Memory: peak growth of the process's resident memory "
        "during the run (indicative on CPU).",
        "",
    ]
    metric_cols = list(problem.metrics)
    header = [
        "variant",
        "method",
        *metric_cols,
        *(["Δm %"] if has_delta else []),
        "time / EW",
        "step (ms)",
        "peak memory (MB)",
        "seeds",
    ]
    table: list[list[str]] = []

    def sort_key(r: dict) -> tuple:
        dm = r.get("delta_m", (float("inf"), 0))[0]
        return (r["variant"], dm if dm == dm else float("inf"), r["method"])

    for row in sorted(rows, key=sort_key):
        if "error" in row:
            cells = [
                row["variant"],
                row["method"],
                *["–"] * len(metric_cols),
                *(["–"] if has_delta else []),
                "–",
                "–",
                "–",
                f"failed: {row['error'][:80]}",
            ]
        else:
            cells = [
                row["variant"],
                row["method"],
                *[_fmt(*row[m]) for m in metric_cols],
                *(
                    [_fmt(*row["delta_m"], 3)]
                    if has_delta and "delta_m" in row
                    else (["–"] if has_delta else [])
                ),
                _fmt(*row["time_vs_ew"], 3),
                _fmt(*row["step_ms"], 3),
                _fmt(*row["memory_mb"], 3),
                str(row["runs"]),
            ]
        table.append([str(c) for c in cells])
    lines += split_table(header, table, metric_cols)
    lines += paired_table(rows)
    excluded = {m: why for m, why in problem.excluded.items()}
    if excluded:
        lines += [
            "",
            "Not applicable here: " + "; ".join(f"`{m}` ({w})" for m, w in excluded.items()),
        ]
    return "\n".join(lines) + "\n"


METRICS_PER_TABLE = 6
"""More metrics than this: a summary table, then the metrics in tables of this many, so that every
table fits a page."""


def split_table(header: list[str], table: list[list[str]], metrics: list[str]) -> list[str]:
    """Markdown for ``table``: one table, or (many metrics) a summary and per-metric tables, each
    led by the variant and method columns."""

    def render(columns: list[int]) -> list[str]:
        out = ["| " + " | ".join(header[c] for c in columns) + " |", "|" + "---|" * len(columns)]
        return out + ["| " + " | ".join(row[c] for c in columns) + " |" for row in table]

    if len(metrics) <= METRICS_PER_TABLE:
        return render(list(range(len(header))))
    first, end = 2, 2 + len(metrics)
    lines = render([0, 1, *range(end, len(header))])
    for start in range(first, end, METRICS_PER_TABLE):
        chunk = list(range(start, min(start + METRICS_PER_TABLE, end)))
        lines += ["", *render([0, 1, *chunk])]
    return lines


def paired_table(rows: list[dict]) -> list[str]:
    """Each method against EW on the same seeds: mean Δm against EW and its 95 % interval."""
    compared = [r for r in rows if "vs_ew" in r]
    if not compared:
        return []
    lines = [
        "",
        "Paired with EW (same seed, variant and batches): the method's Δm against EW over all "
        "metrics, in % (negative: better than EW), mean over seeds with its 95 % Student-t "
        f'interval; "{NOT_DISTINGUISHABLE}" when the interval contains 0.',
        "",
        "| variant | method | seeds | Δm vs EW % [95 % interval] | verdict |",
        "|---|---|---|---|---|",
    ]
    for row in sorted(compared, key=lambda r: (r["variant"], r["vs_ew"]["mean"])):
        v = row["vs_ew"]
        interval = "–" if v["seeds"] < 2 else f"[{v['low']:+.3g}, {v['high']:+.3g}]"
        lines.append(
            f"| {row['variant']} | {row['method']} | {v['seeds']} | {v['mean']:+.3g} {interval} | "
            f"{v['verdict']} |"
        )
    return lines


def plots(problem: Problem, runs: list[dict], rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in runs if "error" not in r and single_task(r["method"]) is None]
    if not ok:
        return
    # Training curves: total loss per method (mean over seeds), first variant.
    first = str(ok[0]["variant"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({r["method"] for r in ok}):
        curves = [
            r["curve"]
            for r in ok
            if r["method"] == method and str(r["variant"]) == first and r["curve"]
        ]
        if not curves:
            continue
        steps = [p[0] for p in curves[0]]
        totals = [
            statistics.fmean(sum(c[i][1:]) for c in curves if i < len(c)) for i in range(len(steps))
        ]
        ax.plot(steps, totals, label=method)
    ax.set_xlabel("step")
    ax.set_ylabel("sum of task losses (training batch)")
    if problem.name != "toy":
        ax.set_yscale("log")
    ax.set_title(
        f"{problem.name}: training curves" + (f" (variant {first})" if first != "None" else "")
    )
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)

    with_delta = [r for r in rows if "delta_m" in r and "error" not in r]
    if with_delta:
        fig, ax = plt.subplots(figsize=(8.5, 4.8), layout="constrained")
        low, high = _fences([r["delta_m"][0] for r in with_delta])
        for n, r in enumerate(sorted(with_delta, key=lambda r: r["method"])):
            x, y = r["time_vs_ew"][0], r["delta_m"][0]
            style = _style(n, plt)
            if low <= y <= high:
                ax.errorbar(x, y, yerr=r["delta_m"][1], label=r["method"], **style)
            else:  # far outliers sit on the edge, with their value, so the rest stays readable
                edge = high if y > high else low
                marker = "^" if y > high else "v"
                ax.plot(x, edge, marker, color="red", label=f"{r['method']} ({y:.1f}, off scale)")
        ax.set_xlabel("step time / EW")
        ax.set_ylabel("Δm % (lower is better)")
        ax.set_title(f"{problem.name}: cost against quality")
        # A legend, not labels beside the points: methods of similar cost and quality overlap.
        ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.savefig(out / "time_vs_delta_m.png", dpi=110)
        plt.close(fig)

    if len(problem.metric_task) == 2 or problem.name == "toy":
        metrics = list(problem.metrics)[:2]
        fig, ax = plt.subplots(figsize=(8.5, 4.8), layout="constrained")
        done = sorted((r for r in rows if "error" not in r), key=lambda r: r["method"])
        xs, ys = ([r[m][0] for r in done] for m in metrics)
        (x_low, x_high), (y_low, y_high) = _fences(xs), _fences(ys)
        inside = [
            x_low <= x <= x_high and y_low <= y <= y_high for x, y in zip(xs, ys, strict=True)
        ]
        kept = [(x, y) for (x, y, i) in zip(xs, ys, inside, strict=True) if i] or list(
            zip(xs, ys, strict=True)
        )
        (x0, x1), (y0, y1) = ((min(v), max(v)) for v in zip(*kept, strict=True))
        pad_x, pad_y = 0.1 * (x1 - x0 or 1.0), 0.1 * (y1 - y0 or 1.0)
        x0, x1, y0, y1 = x0 - pad_x, x1 + pad_x, y0 - pad_y, y1 + pad_y
        for n, (r, x, y, in_range) in enumerate(zip(done, xs, ys, inside, strict=True)):
            name = f"{r['method']}" + (f" ({r['variant']})" if r["variant"] != "None" else "")
            if in_range:
                ax.plot(x, y, linestyle="none", label=name, **_style(n, plt))
            else:  # a far outlier sits on the edge, with its values
                cx, cy = min(max(x, x0), x1), min(max(y, y0), y1)
                ax.plot(cx, cy, "x", color="red", label=f"{name} ({x:.3g}, {y:.3g}, off scale)")
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.set_xlabel(metrics[0])
        ax.set_ylabel(metrics[1])
        ax.set_title(f"{problem.name}: final trade-off between the two tasks")
        ncol = 1 if len(done) <= 14 else 2
        ax.legend(fontsize=7, ncol=ncol, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.savefig(out / "pareto.png", dpi=110)
        plt.close(fig)

    if problem.name == "toy":
        _toy_trajectories(ok, out, plt)
    if problem.name == "scaling":
        _scaling_curves(rows, out, plt)


def _style(n: int, plt: Any) -> dict[str, Any]:
    """Colour and marker of the n-th method, distinct for the first 200 methods."""
    colours = plt.get_cmap("tab20").colors
    # The marker shifts by one each time the colours wrap, so no two of the first 200 look alike.
    marker = "osD^v<>ph*"[(n + n // len(colours)) % 10]
    return {"color": colours[n % len(colours)], "marker": marker, "markersize": 5}


def _fences(values: list[float]) -> tuple[float, float]:
    """Bounds beyond which a point is a far outlier: 5 spreads past the quartiles, the spread
    being the interquartile range or a tenth of the median's size, whichever is larger (methods
    often cluster tightly); infinite when there are too few points to tell."""
    finite = [v for v in values if v == v and abs(v) != float("inf")]
    if len(finite) < 5:
        return -float("inf"), float("inf")
    q1, median, q3 = statistics.quantiles(finite, n=4)
    spread = max(q3 - q1, 0.1 * abs(median), 1e-12)
    return q1 - 5 * spread, q3 + 5 * spread


def _toy_trajectories(runs: list[dict], out: Path, plt: Any) -> None:
    import torch

    from .toy import toy_losses

    methods = sorted({r["method"] for r in runs})
    grid = torch.linspace(-10, 10, 121, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="xy")
    total = torch.zeros_like(xx)
    for i in range(xx.shape[0]):
        for j in range(xx.shape[1]):
            total[i, j] = sum(toy_losses(torch.stack([xx[i, j], yy[i, j]])))
    cols = min(3, len(methods))
    rows_n = (len(methods) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.3 * cols, 3.1 * rows_n), squeeze=False)
    for ax, method in zip(axes.flat, methods, strict=False):
        ax.contourf(xx.numpy(), yy.numpy(), total.numpy(), levels=30, cmap="Greys")
        for r in (r for r in runs if r["method"] == method):
            path = r["trace"]
            ax.plot([p[0] for p in path], [p[1] for p in path], lw=1.2)
            ax.plot(path[0][0], path[0][1], "k.", ms=4)
            ax.plot(path[-1][0], path[-1][1], "r*" if r["metrics"]["pareto"] else "bx", ms=7)
        ax.set_title(method, fontsize=9)
    for ax in list(axes.flat)[len(methods) :]:
        ax.axis("off")
    fig.suptitle(
        "toy: trajectories in parameter space (red star: ended on the Pareto set, blue x: did not)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out / "trajectories.png", dpi=110)
    plt.close(fig)


def _scaling_curves(rows: list[dict], out: Path, plt: Any) -> None:
    """Step time (log-log) and memory against K; loss strategies dashed, markers and colours
    cycling so that two dozen methods stay apart; the legend sits outside the axes."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained")
    colours = plt.get_cmap("tab20").colors
    markers = "osD^v<>ph*"
    for n, method in enumerate(sorted({r["method"] for r in rows if "error" not in r})):
        mine = sorted(
            (r for r in rows if r["method"] == method and "error" not in r),
            key=lambda r: float(r["variant"]),
        )
        ks = [float(r["variant"]) for r in mine]
        loss = method in mtlopt.available() and mtlopt.info(method).kind.value == "loss"
        style = {
            "color": colours[n % len(colours)],
            "marker": markers[n % len(markers)],
            "linestyle": "--" if loss else "-",
            "markersize": 4,
            "label": method,
        }
        a.plot(ks, [r["step_ms"][0] for r in mine], **style)
        b.plot(ks, [r["memory_mb"][0] for r in mine], **style)
    a.set_xlabel("tasks K")
    a.set_ylabel("median step (ms)")
    b.set_xlabel("tasks K")
    b.set_ylabel("peak memory growth (MB)")
    a.set_yscale("log")
    from matplotlib.ticker import NullFormatter

    ticks = sorted({float(r["variant"]) for r in rows if "error" not in r})
    for ax in (a, b):
        # Log-scaled K with one labelled tick per K run: the default minor labels (2×10⁰, 3×10⁰…)
        # ran into each other.
        ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{k:g}" for k in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
    # The legend outside both axes, in its own space: constrained layout keeps the axis labels of
    # the two panels from running into each other and into the legend.
    b.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle("scaling: cost against the number of tasks (dashed: loss weightings)")
    fig.savefig(out / "cost_vs_tasks.png", dpi=110)
    plt.close(fig)
