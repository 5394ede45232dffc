"""DTME-MTL against EW on real data, trained in lockstep on the same batches.

    python -m mtlopt_bench.dtme_study --problem multifashion --steps 600
    python -m mtlopt_bench.dtme_study --problem qm9 --steps 400

Both methods start from the same initial weights and see the same batches; each step runs EW
then DTME, so their step times are measured side by side. Prints DTME's conflict report (rates per
layer and space, chosen layers, parameters added), the step-time ratio after the expansion, and the
test metrics of both at equal steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

import mtlopt

from . import multifashion, qm9
from .problem import Problem

PROBLEMS = {"multifashion": multifashion, "qm9": qm9}


def run(
    problem_name: str, steps: int, batch_size: int, seed: int, analysis_steps: int, lr: float
) -> dict:
    module = PROBLEMS[problem_name]
    definition: Problem = module.PROBLEM
    problem = module.setup(seed, None, False, batch_size=batch_size)
    ew_model, dtme_model = problem.model, copy.deepcopy(problem.model)
    tasks = len(problem.losses(ew_model, problem.batch(0)))
    ew = mtlopt.MTLOptimizer(torch.optim.Adam(ew_model.parameters(), lr=lr), "ew")
    dtme = mtlopt.MTLOptimizer(
        torch.optim.Adam(dtme_model.parameters(), lr=lr),
        mtlopt.create(
            "dtme",
            blocks=dtme_model,
            num_tasks=tasks,
            model=dtme_model,
            analysis_steps=analysis_steps,
            covariance_steps=max(1, analysis_steps // 10),
        ),
    )
    times = {"ew": [], "dtme": []}
    start_all = time.perf_counter()
    for step in range(steps):
        batch = problem.batch(step)
        for name, model, opt in (("ew", ew_model, ew), ("dtme", dtme_model, dtme)):
            start = time.perf_counter()
            opt.zero_grad()
            opt.step(problem.losses(model, batch))
            times[name].append(time.perf_counter() - start)
        if step % max(1, steps // 10) == 0:
            print(
                f"step {step}/{steps}  ew {1e3 * times['ew'][-1]:.0f} ms  "
                f"dtme {1e3 * times['dtme'][-1]:.0f} ms ({dtme.strategy.phase})",
                flush=True,
            )
    wall = time.perf_counter() - start_all
    report = dtme.strategy.report
    after = slice(min(analysis_steps + 5, steps - 1), None)  # skip the expansion step itself
    ratio = statistics.median(times["dtme"][after]) / statistics.median(times["ew"][after])
    analysis_ratio = statistics.median(times["dtme"][analysis_steps // 10 : analysis_steps]) / (
        statistics.median(times["ew"][analysis_steps // 10 : analysis_steps])
    )
    metrics = {"ew": problem.evaluate(ew_model), "dtme": problem.evaluate(dtme_model)}
    result = {
        "problem": definition.description,
        "steps": steps,
        "batch": batch_size,
        "seed": seed,
        "wall_seconds": wall,
        "report": report.as_dict(),
        "report_markdown": report.to_markdown(),
        "step_time_ratio_after_expansion": ratio,
        "step_time_ratio_during_conflict_analysis": analysis_ratio,
        "median_step_ms": {k: 1e3 * statistics.median(v[after]) for k, v in times.items()},
        "metrics": metrics,
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", choices=sorted(PROBLEMS), required=True)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, help="default: 128 MultiFashion, 64 QM9")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--analysis-steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=Path("bench-results/dtme"))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    batch = args.batch or {"multifashion": 128, "qm9": 64}[args.problem]
    result = run(args.problem, args.steps, batch, args.seed, args.analysis_steps, args.lr)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.problem}.json").write_text(json.dumps(result, indent=2))
    print(result["problem"])
    print(result["report_markdown"])
    print(
        f"step time DTME / EW after expansion: {result['step_time_ratio_after_expansion']:.2f} "
        f"(during the conflict analysis: {result['step_time_ratio_during_conflict_analysis']:.2f})"
    )
    print("| metric | EW | DTME |")
    print("|---|---|---|")
    for key in result["metrics"]["ew"]:
        print(
            f"| {key} | {result['metrics']['ew'][key]:.4f} | {result['metrics']['dtme'][key]:.4f} |"
        )
    print(f"wall time {result['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
