"""Does DTME help, and does its placement matter? DTME's controls on the ViT fine-tuning problem.

    python -m mtlopt_bench.dtme_placement --seeds 8 --out bench-results/dtme_placement
    python -m mtlopt_bench.dtme_placement --quick          # a small smoke run

The paper's regime (DTME-MTL, Jeong & Yoon, ICCV 2025): a pretrained trunk
(:mod:`mtlopt_bench.vit_finetune`), fresh heads, and the plan made at iteration 0 by the offline
analysis (:func:`mtlopt.tokens.plan_expansion`, eval mode, a fixed set of batches), the modules
present from step 0. Arms, all from the same trunk, head initialisation and batch order within a
seed (paired):

- ``ew``: plain fine-tuning (equal weights);
- ``dtme``: the conflict-driven plan (TM on the top ρ·D range-conflict layers, TE on the top ρ·D
  null-conflict layers, gated task tokens);
- ``random``: the same counts and the same branch point, layers drawn at random (Table 2);
- ``reverse``: the same counts on the lowest-conflict layers (Table 2);
- ``swapped``: TE on the TM layers and TM on the TE layers (Table 13);
- ``tm_only``, ``te_only``: one module kind of the plan (Table 1);
- ``ew_compute``: EW given DTME's measured compute, in extra steps (steps × DTME's median step
  time over EW's, per seed);
- ``dtme_budget``: the plan under ``budget=2.0`` (branch in the last layers);
- ``dtme_upgrad``: the plan with UPGrad as the base;
- ``dtme_ungated``: the plan with the paper's ungated task tokens;
- ``dtme_intrain``: no plan at iteration 0: EW steps while DTME's in-training analysis counts the
  conflicts (the same 50-step warm-up as EW's warm probe, 10 of them for the covariance), then the
  expansion from that analysis's plan, for the rest of the steps;
- ``stl-0..2``: single-task fine-tunes from the same trunk, for Δm.

Every finished (seed, arm) is written at once to ``OUT/runs/seed<k>/<arm>.json`` and reused by a
rerun with the same settings; ``OUT/results.{md,json}`` hold the tables.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from scipy import stats

import mtlopt
from mtlopt.metrics import delta_m
from mtlopt.tokens import TokenPlan, choose_layers, plan_expansion

from . import vit_finetune as vf

ARMS = [
    "ew",
    "dtme",
    "ew_compute",
    "random",
    "reverse",
    "swapped",
    "tm_only",
    "te_only",
    "dtme_budget",
    "dtme_upgrad",
    "dtme_ungated",
    "dtme_intrain",
]
OPTIONAL_ARMS: list[str] = []
PLANLESS = ("ew", "ew_compute", "dtme_intrain")
"""Arms without a plan made before training (DTME in-training plans its own)."""
# The placement question's arms run first for every seed, the other arms after them: an
# interrupted run then already answers "does conflict-driven placement beat random?" on all seeds.
FIRST_ARMS = ("ew", "dtme", "random", "reverse")
BUDGET = 2.0
METRICS = vf.PROBLEM.metrics
LABELS = {
    "ew": "EW",
    "dtme": "DTME (conflict-driven plan)",
    "ew_compute": "EW with DTME's compute (extra steps)",
    "random": "random placement (same counts, branch)",
    "reverse": "reverse placement (lowest conflict)",
    "swapped": "swapped TM/TE",
    "tm_only": "TM only",
    "te_only": "TE only",
    "dtme_budget": f"budgeted DTME (budget={BUDGET})",
    "dtme_upgrad": "DTME + UPGrad",
    "dtme_intrain": "DTME, in-training analysis (plan after the warm-up)",
    "dtme_ungated": "DTME, ungated tokens (paper)",
}

SHORT = {
    "dtme": "DTME",
    "ew_compute": "EW + compute",
    "random": "random",
    "reverse": "reverse",
    "swapped": "swapped",
    "tm_only": "TM only",
    "te_only": "TE only",
    "dtme_budget": "budgeted",
    "dtme_upgrad": "+UPGrad",
    "dtme_intrain": "in-training",
    "dtme_ungated": "ungated",
}
"""The arms' names in the cost panel of :func:`plot_gains`."""


def plans(setting: vf.Setting, seed: int, analysis: int, bootstrap: int) -> dict[str, TokenPlan]:
    """Every arm's plan for ``seed``, from one offline analysis of the seed's model at
    iteration 0 (its fresh heads are part of the loss)."""
    inst = vf.instance(setting, seed, analysis)
    model = inst.model
    plan = plan_expansion(
        model,
        inst.plan_batches,
        lambda b: vf.losses(model, b),
        bootstrap=bootstrap,
        disjoint=4 if analysis >= 8 else 0,
        seed=seed,
    )
    report = plan.report
    assert report is not None
    budgeted = choose_layers(
        report.range_rates,
        report.null_rates,
        plan.num_tasks,
        0.5,
        plan.expansion.tokens_per_task,
        plan.sequence_length,
        budget=BUDGET,
        gated=True,
    )
    budget_plan = plan.with_layers(budgeted.modulation_layers, budgeted.expansion_layers)
    budget_plan.selection = f"conflict, budget={BUDGET}"
    ungated = TokenPlan.explicit(
        plan.num_tasks,
        plan.depth,
        plan.modulation_layers,
        plan.expansion_layers,
        tokens_per_task=plan.expansion.tokens_per_task,
        sequence_length=plan.sequence_length,
        gated=False,
        dims=plan.dims,
        selection="conflict, ungated",
    )
    ungated.report = plan.report
    return {
        "dtme": plan,
        "dtme_upgrad": plan,
        "random": plan.random(seed),
        "reverse": plan.reverse(),
        "swapped": plan.swapped(),
        "tm_only": plan.modulation_only(),
        "te_only": plan.tokens_only(),
        "dtme_budget": budget_plan,
        "dtme_ungated": ungated,
    }


def train_arm(
    setting: vf.Setting,
    seed: int,
    arm: str,
    steps: int,
    plan: TokenPlan | None,
    analysis: int,
    warm_probe: int = 0,
) -> dict[str, Any]:
    """Fine-tune one arm of one seed; its metrics, times and plan."""
    inst = vf.instance(setting, seed, analysis)
    model = inst.model
    task = int(arm.split("-")[1]) if arm.startswith("stl-") else None
    if plan is not None:
        strategy = mtlopt.create(
            "dtme",
            model=model,
            plan=plan,
            seed=seed,
            base="upgrad" if arm == "dtme_upgrad" else "ew",
        )
    elif arm == "dtme_intrain":
        analysis = warm_steps(steps)
        strategy = mtlopt.create(
            "dtme",
            model=model,
            seed=seed,
            analysis_steps=analysis,
            covariance_steps=max(1, analysis // 5),
        )
    else:
        strategy = mtlopt.create("ew")
    opt = mtlopt.MTLOptimizer(torch.optim.Adam(model.parameters(), lr=inst.lr), strategy)
    times, cpu, warm = [], [], None
    start, start_cpu = time.perf_counter(), time.process_time()
    for step in range(steps):
        if warm_probe and step == warm_probe:  # the analysis after a short warm-up (diagnostic)
            warm = plan_expansion(
                model, inst.plan_batches, lambda b: vf.losses(model, b), bootstrap=100, seed=seed
            ).as_dict()
        batch = inst.batch(step)
        began, began_cpu = time.perf_counter(), time.process_time()
        opt.zero_grad()
        values = inst.losses(model, batch)
        opt.step(values if task is None else [values[task]])
        times.append(time.perf_counter() - began)
        cpu.append(time.process_time() - began_cpu)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    metrics = inst.evaluate(model)
    if arm == "dtme_intrain" and getattr(strategy, "plan", None) is not None:
        chosen = strategy.plan  # type: ignore[attr-defined]
        plan_record: dict[str, Any] | None = {
            "modulation_layers": list(chosen.modulation_layers),
            "expansion_layers": list(chosen.expansion_layers),
            "predicted_multiplier": chosen.predicted_multiplier,
            "expanded_at": warm_steps(steps),
        }
    else:
        plan_record = None if plan is None else plan.as_dict()
    if task is not None:
        metrics = {k: v for k, v in metrics.items() if vf.PROBLEM.metric_task[k] == task}
    result = {
        "seed": seed,
        "arm": arm,
        "steps": steps,
        "metrics": metrics,
        "train_seconds": seconds,
        "train_cpu_seconds": cpu_seconds,
        "median_step_ms": 1e3 * statistics.median(times[min(5, len(times) - 1) :]),
        # CPU time of this process: on a shared machine far steadier than wall time
        "median_step_cpu_ms": 1e3 * statistics.median(cpu[min(5, len(cpu) - 1) :]),
        "plan": plan_record,
    }
    if warm is not None:
        result["warm_plan"] = {"after_steps": warm_probe, **warm}
    return result


def warm_steps(steps: int) -> int:
    """The warm-up of EW's probe and of the in-training analysis: 50 steps, at most a fifth of
    the run (at least 2)."""
    return max(2, min(50, steps // 5))


def _fingerprint(config: dict) -> str:
    return hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def run(
    out: Path,
    seeds: int,
    steps: int,
    setting: vf.Setting,
    arms: list[str],
    stl_seeds: int,
    analysis: int,
    bootstrap: int,
    command: str,
    summarise_only: bool = False,
    shard: tuple[int, int] = (0, 1),
) -> dict[str, Any]:
    from tqdm import tqdm

    config = {
        "steps": steps,
        "setting": asdict(setting),
        "analysis_batches": analysis,
        "bootstrap": bootstrap,
        "mtlopt": mtlopt.__version__,
    }
    key = _fingerprint(config)
    if summarise_only:  # the runs finished so far (of a run still going, or interrupted)
        results = []
        for path in sorted((out / "runs").glob("seed*/*.json")):
            saved = json.loads(path.read_text())
            if saved.get("fingerprint") == key and saved["arm"] in [*arms, "stl-0", "stl-1", "stl-2"]:
                results.append(saved)
        summary = summarise(results, arms, config, command, math.nan, setting)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"summary": summary, "runs": results}))
        (out / "results.md").write_text(summary["markdown"])
        plot_gains(summary, out / "placement.png")
        return summary
    start = time.perf_counter()
    trunk_seconds = time.perf_counter()
    vf.pretrained_trunk(setting.pretraining, progress=True)
    trunk_seconds = time.perf_counter() - trunk_seconds
    index, count = shard
    jobs = [
        (seed, arm)
        for seed in range(seeds)
        if seed % count == index
        for arm in [*arms, *([f"stl-{t}" for t in range(3)] if seed < stl_seeds else [])]
    ]
    jobs.sort(key=lambda job: job[1] not in FIRST_ARMS)  # stable: seed order within each pass
    results: list[dict] = []
    seed_plans: dict[int, dict[str, TokenPlan]] = {}
    bar = tqdm(jobs, desc="dtme placement", unit="run", dynamic_ncols=True)
    for seed, arm in bar:
        bar.set_postfix_str(f"seed {seed} {arm}")
        path = out / "runs" / f"seed{seed}" / f"{arm}.json"
        if path.exists():
            saved = json.loads(path.read_text())
            if saved.get("fingerprint") == key:
                results.append(saved)
                continue
        plan = None
        if arm not in PLANLESS and not arm.startswith("stl-"):
            if seed not in seed_plans:
                seed_plans[seed] = plans(setting, seed, analysis, bootstrap)
            plan = seed_plans[seed][arm]
        arm_steps = steps
        if arm == "ew_compute":
            mine = {r["arm"]: r for r in results if r["seed"] == seed}
            if "dtme" in mine and "ew" in mine:
                ratio = mine["dtme"]["median_step_cpu_ms"] / mine["ew"]["median_step_cpu_ms"]
            else:
                ratio = 1.0
            arm_steps = max(steps, round(steps * ratio))
        result = train_arm(
            setting,
            seed,
            arm,
            arm_steps,
            plan,
            analysis,
            warm_probe=warm_steps(steps) if arm == "ew" else 0,
        )
        result["fingerprint"] = key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, path)
        results.append(result)
    wall = time.perf_counter() - start
    summary = summarise(results, arms, config, command, wall, setting)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"summary": summary, "runs": results}, indent=1))
    (out / "results.md").write_text(summary["markdown"])
    plot_gains(summary, out / "placement.png")
    return summary


def _interval(values: list[float]) -> tuple[float, float, float]:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    mean, low, high = _interval(values)
    if math.isnan(low):
        return f"{mean:+.2f} (1 seed)"
    return f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]"


def _gain(mine: dict[str, float], reference: dict[str, float]) -> float:
    """Relative change over all metrics in %, positive = better than ``reference`` (the paper's
    sign of Δm; the library's ``delta_m`` is its negative)."""
    return -delta_m(mine, reference, METRICS)


def summarise(
    results: list[dict],
    arms: list[str],
    config: dict,
    command: str,
    wall: float,
    setting: vf.Setting,
) -> dict[str, Any]:
    started = sorted({r["seed"] for r in results})
    by = {(r["seed"], r["arm"]): r for r in results}
    # Each arm is paired with EW over the seeds where both finished (a partial run's arms can stand
    # on different numbers of seeds: the table's "seeds" column says how many).
    seeds = [s for s in started if (s, "ew") in by]
    complete = [s for s in seeds if all((s, a) in by for a in arms)]
    stl: dict[int, dict[str, float]] = {}
    for seed in seeds:
        parts = [by.get((seed, f"stl-{t}")) for t in range(3)]
        if all(parts):
            stl[seed] = {k: v for p in parts for k, v in p["metrics"].items()}  # type: ignore[index]
    stl_mean = (
        {m: statistics.fmean(s[m] for s in stl.values()) for m in METRICS} if stl else None
    )
    rows = []
    ew_ms = {s: by[(s, "ew")]["median_step_cpu_ms"] for s in seeds if (s, "ew") in by}
    for arm in arms:
        done = [s for s in seeds if (s, arm) in by]
        if not done:
            continue
        vs_ew = [
            _gain(by[(s, arm)]["metrics"], by[(s, "ew")]["metrics"])
            for s in done
            if (s, "ew") in by and arm != "ew"
        ]
        vs_stl = [
            _gain(by[(s, arm)]["metrics"], stl.get(s, stl_mean)) for s in done if stl_mean
        ]
        vs_dtme = [
            _gain(by[(s, "dtme")]["metrics"], by[(s, arm)]["metrics"])
            for s in done
            if (s, "dtme") in by and arm not in ("dtme", "dtme_upgrad")
        ]
        plans_seen = Counter(
            (
                tuple(by[(s, arm)]["plan"]["modulation_layers"]),
                tuple(by[(s, arm)]["plan"]["expansion_layers"]),
            )
            for s in done
            if by[(s, arm)]["plan"]
        )
        ratio = [by[(s, arm)]["median_step_cpu_ms"] / ew_ms[s] for s in done if s in ew_ms]
        metrics = {
            m: statistics.fmean(by[(s, arm)]["metrics"][m] for s in done) for m in METRICS
        }
        rows.append(
            {
                "arm": arm,
                "seeds": len(done),
                "metrics": metrics,
                "gain_vs_ew": vs_ew,
                "delta_m_vs_stl": vs_stl,
                "dtme_gain_over_arm": vs_dtme,
                "step_time_vs_ew": statistics.fmean(ratio) if ratio else math.nan,
                "train_seconds": statistics.fmean(by[(s, arm)]["train_seconds"] for s in done),
                "train_cpu_seconds": statistics.fmean(
                    by[(s, arm)]["train_cpu_seconds"] for s in done
                ),
                "steps": statistics.fmean(by[(s, arm)]["steps"] for s in done),
                "plans": {f"TM {list(k[0])} TE {list(k[1])}": n for k, n in plans_seen.items()},
                "predicted": statistics.fmean(
                    by[(s, arm)]["plan"]["predicted_multiplier"] for s in done
                )
                if plans_seen
                else 1.0,
            }
        )
    stability = []
    for seed in seeds:
        run = by.get((seed, "dtme"))
        if run is None:
            continue
        plan = run["plan"]
        stab = plan.get("stability") or {}
        warm = (by.get((seed, "ew")) or {}).get("warm_plan")
        stability.append(
            {
                "seed": seed,
                "tm": plan["modulation_layers"],
                "te": plan["expansion_layers"],
                "range_rates": plan.get("range_rates"),
                "null_rates": plan.get("null_rates"),
                "agreement": stab.get("agreement"),
                "tm_margin": stab.get("modulation_margin"),
                "te_margin": stab.get("expansion_margin"),
                "disjoint": stab.get("disjoint_plans"),
                "warm": None
                if warm is None
                else {
                    "after_steps": warm["after_steps"],
                    "tm": warm["modulation_layers"],
                    "te": warm["expansion_layers"],
                    "range_rates": warm["range_rates"],
                    "null_rates": warm["null_rates"],
                },
            }
        )
    summary = {
        "complete_seeds": complete,
        "paired_seeds": seeds,
        "started_seeds": started,
        "config": config,
        "command": command,
        "wall_seconds": wall,
        "trunk": vf.trunk_info(setting.pretraining),
        "rows": rows,
        "stability": stability,
        "stl": stl_mean,
    }
    summary["markdown"] = markdown(summary)
    return summary


def _layers(counter: dict[str, int]) -> str:
    if not counter:
        return "–"
    top, n = max(counter.items(), key=lambda kv: kv[1])
    total = sum(counter.values())
    return top if n == total else f"{top} ({n}/{total} seeds; {len(counter)} distinct)"


def plot_gains(summary: dict[str, Any], path: Path) -> None:
    """Two panels: each arm's paired relative change against EW (one dot per seed, the mean and its
    95 % interval), and the same means against the arm's step time over EW's (quality for cost)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary["rows"] if r["arm"] != "ew" and r["gain_vs_ew"]]
    if not rows:
        return
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(11, 0.42 * len(rows) + 1.6), layout="constrained",
        gridspec_kw={"width_ratios": [1.35, 1]},
    )
    for y, row in enumerate(reversed(rows)):
        colour = f"C{y % 10}"
        gains = row["gain_vs_ew"]
        mean, low, high = _interval(gains)
        left.scatter(gains, [y] * len(gains), s=12, color="0.6", zorder=2)
        error = None if math.isnan(low) else [[mean - low], [high - mean]]
        left.errorbar(mean, y, xerr=error, fmt="o", color=colour, capsize=3, zorder=3)
        right.errorbar(row["step_time_vs_ew"], mean, yerr=error, fmt="o", color=colour, capsize=3)
        right.annotate(SHORT.get(row["arm"], row["arm"]), (row["step_time_vs_ew"], mean),
                       fontsize=7, color=colour, xytext=(4, 2), textcoords="offset points")
    left.axvline(0.0, color="k", lw=0.8)
    left.set_yticks(range(len(rows)), [LABELS.get(r["arm"], r["arm"]) for r in reversed(rows)],
                    fontsize=8)
    left.set_xlabel("change against EW, % (paired seeds; mean and 95 % interval)")
    right.axhline(0.0, color="k", lw=0.8)
    right.set_xscale("log")
    right.set_xticks([1, 1.5, 2, 3, 4, 6, 8], ["1", "1.5", "2", "3", "4", "6", "8"])
    right.minorticks_off()
    right.set_xlabel("step time / EW's (CPU time, median)")
    right.set_ylabel("change against EW, %")
    seeds = max(r["seeds"] for r in rows)
    fig.suptitle(f"DTME and its controls on the pretrained ViT ({seeds} paired seeds)", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(summary: dict[str, Any]) -> str:
    c = summary["config"]
    trunk = summary["trunk"]
    lines = [
        f"Command: `{summary['command']}`; wall time "
        + (
            "not known (tabulated from the finished runs)"
            if math.isnan(summary["wall_seconds"])
            else f"{summary['wall_seconds']:.0f} s"
        )
        + "; "
        f"{c['steps']} fine-tuning steps × batch {c['setting']['batch']}; analysis on "
        f"{c['analysis_batches']} fixed batches of 128 at iteration 0 (eval mode); trunk pretrained "
        f"{trunk.get('steps', '?')} steps × {trunk.get('batch', '?')}, source accuracy "
        f"{trunk.get('source_accuracy', float('nan')):.3f}; seeds with every arm finished: "
        f"{len(summary['complete_seeds'])} of {len(summary['started_seeds'])} started.",
        "",
        "Gains in %, positive = better: the mean over the three metrics of the relative change "
        "(the paper's sign of Δm); [95 % Student-t interval over the paired seeds]. Step / EW: "
        "median step CPU time of this process over EW's, same seed (CPU time, not wall time: "
        "the machine is shared); predicted: the plan's block-compute multiplier; CPU s: "
        "training CPU seconds per run.",
        "",
        "| arm | seeds | left acc | right acc | parts mIoU | vs EW | Δm vs single-task | "
        "DTME over this arm | step / EW | predicted | CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        m = row["metrics"]
        lines.append(
            f"| {LABELS.get(row['arm'], row['arm'])} | {row['seeds']} | {m['left acc']:.4f} | "
            f"{m['right acc']:.4f} | {m['parts mIoU']:.4f} | {_cell(row['gain_vs_ew'])} | "
            f"{_cell(row['delta_m_vs_stl'])} | {_cell(row['dtme_gain_over_arm'])} | "
            f"{row['step_time_vs_ew']:.2f} | {row['predicted']:.2f} | "
            f"{row['train_cpu_seconds']:.0f} |"
        )
    lines += ["", "Plans (the most common across seeds):", "", "| arm | TM / TE layers |", "|---|---|"]
    for row in summary["rows"]:
        if row["plans"]:
            lines.append(f"| {LABELS.get(row['arm'], row['arm'])} | {_layers(row['plans'])} |")
    if summary["stability"]:
        lines += [
            "",
            "Plan stability per seed (bootstrap over the analysis batches; margin = lowest chosen "
            "rate − highest unchosen, 95 % interval; disjoint = plans on 4 disjoint quarters of "
            "the batches; warm = the plan from the same analysis after a short EW warm-up):",
            "",
            "| seed | TM | TE | same plan | TM margin | TE margin | disjoint TM | warm TM / TE |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for s in summary["stability"]:
            def margin(m):
                if not m or m[0] is None or (isinstance(m[0], float) and math.isnan(m[0])):
                    return "–"
                return f"{m[0]:+.3f} [{m[1]:+.3f}, {m[2]:+.3f}]"

            disjoint = " ".join(str(p[0]) for p in (s["disjoint"] or []))
            warm = "–" if s["warm"] is None else f"{s['warm']['tm']} / {s['warm']['te']}"
            agreement = "–" if s["agreement"] is None else f"{100 * s['agreement']:.0f} %"
            lines.append(
                f"| {s['seed']} | {s['tm']} | {s['te']} | {agreement} | {margin(s['tm_margin'])} "
                f"| {margin(s['te_margin'])} | {disjoint} | {warm} |"
            )
        rates = [s for s in summary["stability"] if s["range_rates"]]
        if rates:
            depth = len(rates[0]["range_rates"])

            def spread(key: str, source: list) -> str:
                cells = []
                for d in range(depth):
                    values = [x[key][d] for x in source]
                    cells.append(f"{statistics.fmean(values):.3f}")
                return " / ".join(cells)

            lines += [
                "",
                f"Mean conflict rate per layer (0 → {depth - 1}) over seeds, at iteration 0: "
                f"range {spread('range_rates', rates)}; null {spread('null_rates', rates)}.",
            ]
            warm = [s["warm"] for s in summary["stability"] if s["warm"]]
            if warm:
                lines.append(
                    f"After {warm[0]['after_steps']} EW steps: range "
                    f"{spread('range_rates', warm)}; null {spread('null_rates', warm)}."
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--train", type=int, default=vf.TRAIN)
    parser.add_argument("--test", type=int, default=vf.TEST)
    parser.add_argument("--stl-seeds", type=int, help="seeds with single-task runs (default all)")
    parser.add_argument("--analysis-batches", type=int, default=8, help="of 128 images")
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--arms", help=f"comma-separated (default {','.join(ARMS)})")
    parser.add_argument("--quick", action="store_true", help="tiny pretraining, 2 seeds, 20 steps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--summarise", action="store_true", help="only tabulate the runs finished so far"
    )
    parser.add_argument(
        "--shard",
        default="0/1",
        help="i/n: run only the seeds s with s %% n == i (run n processes on one --out, then "
        "--summarise)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results/dtme_placement"))
    args = parser.parse_args(argv)
    try:
        shard = tuple(int(x) for x in args.shard.split("/"))
        if len(shard) != 2 or not 0 <= shard[0] < shard[1]:
            raise ValueError
    except ValueError:
        raise SystemExit(
            f"--shard takes i/n with 0 <= i < n, e.g. 1/2; got {args.shard!r}"
        ) from None
    torch.set_num_threads(args.threads)
    arms = args.arms.split(",") if args.arms else list(ARMS)
    unknown = [a for a in arms if a not in ARMS + OPTIONAL_ARMS]
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; choose from {ARMS + OPTIONAL_ARMS}")
    arms = ["ew", *[a for a in arms if a != "ew"]]
    if "ew_compute" in arms and "dtme" in arms:  # it needs DTME's measured step time first
        arms.remove("ew_compute")
        arms.insert(arms.index("dtme") + 1, "ew_compute")
    if args.quick:
        setting = vf.Setting(vf.QUICK_PRETRAINING, vf.QUICK_TRAIN, vf.QUICK_TEST, 32)
        seeds, steps, analysis, bootstrap = 2, 20, 4, 20
    else:
        setting = vf.Setting(vf.FULL_PRETRAINING, args.train, args.test, args.batch)
        seeds, steps, analysis, bootstrap = (
            args.seeds,
            args.steps,
            args.analysis_batches,
            args.bootstrap,
        )
    command = "python -m mtlopt_bench.dtme_placement " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    summary = run(
        args.out,
        seeds,
        steps,
        setting,
        arms,
        seeds if args.stl_seeds is None else args.stl_seeds,
        analysis,
        bootstrap,
        command.strip(),
        args.summarise,
        shard,  # type: ignore[arg-type]
    )
    print(summary["markdown"])
    print(f"results under {args.out}/")
    return 0



def docs_tables(summary: dict[str, Any]) -> str:
    """The tables of the docs page: narrower than :func:`markdown`'s (one idea per table)."""
    rows = summary["rows"]
    out = [
        "| arm | seeds | vs EW, % | DTME over the arm, % | Δm vs single-task, % | step / EW |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        out.append(
            f"| {LABELS.get(row['arm'], row['arm'])} | {row['seeds']} | "
            f"{_cell(row['gain_vs_ew'])} | {_cell(row['dtme_gain_over_arm'])} | "
            f"{_cell(row['delta_m_vs_stl'])} | {row['step_time_vs_ew']:.2f} |"
        )
    out += ["", "| arm | left acc | right acc | parts mIoU | plan (most seeds) |", "|---|---|---|---|---|"]
    for row in rows:
        m = row["metrics"]
        out.append(
            f"| {LABELS.get(row['arm'], row['arm'])} | {m['left acc']:.4f} | "
            f"{m['right acc']:.4f} | {m['parts mIoU']:.4f} | {_layers(row['plans'])} |"
        )
    if summary["stability"]:
        out += [
            "",
            "| seed | TM / TE at iteration 0 | same plan | TM margin [95 %] | TE margin [95 %] | "
            "TM / TE after warm-up |",
            "|---|---|---|---|---|---|",
        ]
        for s in summary["stability"]:
            def margin(m):
                if not m or m[0] is None or (isinstance(m[0], float) and math.isnan(m[0])):
                    return "–"
                return f"{m[0]:+.3f} [{m[1]:+.3f}, {m[2]:+.3f}]"

            warm = "–" if s["warm"] is None else f"{s['warm']['tm']} / {s['warm']['te']}"
            agreement = "–" if s["agreement"] is None else f"{100 * s['agreement']:.0f} %"
            out.append(
                f"| {s['seed']} | {s['tm']} / {s['te']} | {agreement} | {margin(s['tm_margin'])} "
                f"| {margin(s['te_margin'])} | {warm} |"
            )
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
