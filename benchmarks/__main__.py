"""``mtlopt-bench``: compare multi-task strategies side by side on real problems.

    mtlopt-bench list
    mtlopt-bench run                       # quick default: every problem, lightly (< 10 min, 2 cores)
    mtlopt-bench run qm9 --methods all --seeds 3 --out bench-results
    mtlopt-bench run toy --methods ew,mgda,pcgrad,cagrad,nash_mtl,famo --steps 35000
    mtlopt-bench run perf                  # step-time ratios (floor, LibMTL, modes, solvers)
    mtlopt-bench run perf --sections small,solvers  # only those sections of the page
    mtlopt-bench run --problem my_pkg.my_module:problem --seeds 3   # your own problem

Finished runs are cached under OUT/runs and reused; results go to OUT/<problem>/results.{json,csv,md}
and PNG plots.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

import mtlopt

from . import multifashion, perf, qm9, scaling, toy, user_problem, vit_finetune
from .data import DataMissing
from .problem import Problem
from .report import write
from .suite import LIBMTL_PREFIX, RunSpec, cached, execute

PROBLEMS: dict[str, Problem] = {
    p.name: p
    for p in (
        toy.PROBLEM,
        multifashion.PROBLEM,
        qm9.PROBLEM,
        scaling.PROBLEM,
        vit_finetune.PROBLEM,
    )
}


def applicable(problem: Problem) -> list[str]:
    names = [n for n in mtlopt.available() if n not in problem.excluded]
    if problem.name in ("toy", "scaling"):
        names = [n for n in names if n != "dtme"]
    return names


def plan(
    problem: Problem, methods: list[str], seeds: int, steps: int, quick: bool
) -> list[RunSpec]:
    variants = problem.quick_variants if quick and problem.quick_variants else problem.variants
    specs = []
    for variant in variants:
        for seed in range(seeds):
            for method in methods:
                specs.append(RunSpec(problem.name, variant, method, seed, steps, quick))
            if problem.single_task_baselines:
                for task in range(len(problem.tasks)):
                    specs.append(RunSpec(problem.name, variant, f"stl-{task}", seed, steps, quick))
    return specs


def run_problem(
    problem: Problem,
    methods: list[str] | None,
    seeds: int | None,
    steps: int | None,
    quick: bool,
    out: Path,
    command: str,
    with_libmtl: bool = False,
) -> bool:
    from tqdm import tqdm

    chosen = methods or problem.quick_methods if quick else (methods or applicable(problem))
    if methods == ["all"]:
        chosen = applicable(problem)
    unknown = [m for m in chosen if m not in mtlopt.available()]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; see `mtlopt-bench list`")
    chosen = ["ew", *[m for m in chosen if m != "ew"]]  # EW is the time reference
    skipped = [m for m in chosen if m in problem.excluded]
    chosen = [m for m in chosen if m not in problem.excluded]
    if with_libmtl:
        from .libmtl_peer import LIBMTL_METHODS, available

        if not available():
            raise SystemExit(
                "--with-libmtl: LibMTL is not installed (pip install --no-deps libmtl==1.1.5)"
            )
        chosen += [f"{LIBMTL_PREFIX}{m}" for m in chosen if m in LIBMTL_METHODS]
    seeds = seeds or (1 if quick else 3)
    steps = steps or (problem.quick_steps if quick else problem.steps)
    try:
        problem.setup(0, (problem.quick_variants or problem.variants)[0], quick)
    except DataMissing as missing:
        print(f"{problem.name}: skipped: {missing}")
        return False
    for method in skipped:
        print(f"{problem.name}: {method} does not apply: {problem.excluded[method]}")
    specs = plan(problem, chosen, seeds, steps, quick)
    results = []
    bar = tqdm(specs, desc=problem.name, unit="run", dynamic_ncols=True)
    for spec in bar:
        bar.set_postfix_str(
            f"{spec.method} seed {spec.seed}"
            + (f" variant {spec.variant}" if spec.variant is not None else "")
        )
        result = cached(spec, problem, out)
        if result is None:
            result = execute(spec, problem, out)
            if "error" in result:
                tqdm.write(
                    f"{problem.name}: {spec.method} seed {spec.seed} failed: {result['error']}"
                )
        results.append(result)
    write(problem, results, out / problem.name, command)
    print((out / problem.name / "results.md").read_text())
    return True


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="mtlopt-bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="problems and strategies")
    run = sub.add_parser("run", help="train, evaluate and write results")
    run.add_argument(
        "problem",
        nargs="?",
        choices=sorted([*PROBLEMS, "perf"]),
        help="omit for the quick default over every problem",
    )
    run.add_argument(
        "--problem",
        dest="user_problem",
        metavar="MODULE:ATTRIBUTE",
        help="your own problem: a mtlopt_bench.problem.Problem (or a function returning one)",
    )
    run.add_argument("--methods", help="comma-separated strategy names, or 'all'")
    run.add_argument("--seeds", type=int)
    run.add_argument("--steps", type=int)
    run.add_argument("--quick", action="store_true", help="small data and step budgets")
    run.add_argument("--out", type=Path, default=Path("bench-results"))
    run.add_argument(
        "--with-libmtl",
        action="store_true",
        help="also run LibMTL 1.1.5's implementation of each chosen method it has (rows libmtl:NAME)",
    )
    run.add_argument(
        "--sections",
        help="perf only: comma-separated sections to run alone ("
        + ",".join(perf.NEW_SECTIONS)
        + "); printed, and replaced in docs/perf.md on a full run",
    )
    args = parser.parse_args(argv)
    if args.command == "list":
        print("problems:")
        for p in PROBLEMS.values():
            print(f"  {p.name:13s} {p.description}")
        print(f"  {'perf':13s} {perf.__doc__.splitlines()[0]}")
        print("strategies:")
        for name in mtlopt.available():
            info = mtlopt.info(name)
            print(f"  {name:13s} {info.kind.value:8s} {info.cost.value:14s} {info.paper}")
        return 0
    torch.set_num_threads(min(2, torch.get_num_threads()))
    command = "mtlopt-bench " + " ".join(shlex.quote(a) for a in argv)
    methods = args.methods.split(",") if args.methods else None
    quick = args.quick or (args.problem is None and not args.user_problem)
    start = time.perf_counter()
    if args.problem == "perf":
        # The docs page is refreshed by full runs from a checkout (where docs/ exists) only.
        write_docs = not quick and Path("mkdocs.yml").exists() and Path("docs").is_dir()
        if args.sections:
            names = args.sections.split(",")
            print(perf.run_sections(names, args.out, quick, command, write_docs, _progress))
        else:
            print(perf.run(args.out, quick, command, write_docs, progress=_progress))
        print(f"wall time {time.perf_counter() - start:.0f} s; results under {args.out}/perf/")
        return 0
    if args.user_problem:
        if args.problem:
            parser.error("give either a built-in problem or --problem, not both")
        problem = user_problem.load(args.user_problem)
        ran = run_problem(
            problem,
            methods,
            args.seeds,
            args.steps,
            args.quick,
            args.out,
            command,
            args.with_libmtl,
        )
        print(f"wall time {time.perf_counter() - start:.0f} s; results under {args.out}/")
        return 0 if ran else 1
    problems = [PROBLEMS[args.problem]] if args.problem else list(PROBLEMS.values())
    ran = [
        run_problem(p, methods, args.seeds, args.steps, quick, args.out, command, args.with_libmtl)
        for p in problems
    ]
    if args.problem is None:  # the quick default measures the step-time ratios lightly too
        print(perf.run(args.out, True, command, False, progress=_progress))
        ran.append(True)
    print(f"wall time {time.perf_counter() - start:.0f} s; results under {args.out}/")
    return 0 if any(ran) else 1


if __name__ == "__main__":
    raise SystemExit(main())
