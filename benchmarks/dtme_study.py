"""DTME-MTL against EW on real data, trained in lockstep on the same batches.

    python -m benchmarks.dtme_study --problem multifashion --steps 600
    python -m benchmarks.dtme_study --problem qm9 --steps 400

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import mtlopt

from .data import QM9_TARGETS, multifashion, qm9
from .models import SetTransformer, ViT


@dataclass
class Problem:
    model: nn.Module
    batch: Callable[[int], tuple]
    losses: Callable[[nn.Module, tuple], list[torch.Tensor]]
    evaluate: Callable[[nn.Module], dict[str, float]]
    lower_is_better: bool
    description: str


def multifashion_problem(batch_size: int, seed: int) -> Problem:
    train, test = multifashion("train", 20000, seed), multifashion("test", 5000, seed + 1)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train.images), generator=generator)

    def batch(step: int) -> tuple:
        start = (step * batch_size) % (len(order) - batch_size)
        idx = order[start : start + batch_size]
        return train.images[idx], train.labels[idx, :2]

    def losses(model: nn.Module, b: tuple) -> list[torch.Tensor]:
        images, labels = b
        return [
            nn.functional.cross_entropy(out, labels[:, i]) for i, out in enumerate(model(images))
        ]

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, float]:
        model.eval()
        correct = torch.zeros(2)
        for start in range(0, len(test.images), 500):
            outs = model(test.images[start : start + 500])
            for i, out in enumerate(outs):
                correct[i] += (out.argmax(-1) == test.labels[start : start + 500, i]).sum()
        model.train()
        return {
            "left acc": float(correct[0]) / len(test.images),
            "right acc": float(correct[1]) / len(test.images),
        }

    torch.manual_seed(seed)
    return Problem(
        ViT([10, 10]),
        batch,
        losses,
        evaluate,
        False,
        "MultiFashion 36×36, 2 tasks, ViT dim 64 depth 4 patch 6, train 20k / test 5k",
    )


def qm9_problem(batch_size: int, seed: int) -> Problem:
    data = qm9(cache=Path("bench-results/cache/qm9.pt"))
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data.atoms), generator=generator)
    test_idx, train_idx = order[:5000], order[5000:]
    mean = data.targets[train_idx].mean(0)
    std = data.targets[train_idx].std(0)

    def batch(step: int) -> tuple:
        start = (step * batch_size) % (len(train_idx) - batch_size)
        idx = train_idx[start : start + batch_size]
        return data.atoms[idx], data.positions[idx], (data.targets[idx] - mean) / std

    def losses(model: nn.Module, b: tuple) -> list[torch.Tensor]:
        atoms, positions, targets = b
        return [(out - targets[:, i]).abs().mean() for i, out in enumerate(model(atoms, positions))]

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, float]:
        model.eval()
        errors = torch.zeros(len(QM9_TARGETS))
        for start in range(0, len(test_idx), 1000):
            idx = test_idx[start : start + 1000]
            outs = model(data.atoms[idx], data.positions[idx])
            for i, out in enumerate(outs):
                errors[i] += ((out * std[i] + mean[i]) - data.targets[idx, i]).abs().sum()
        model.train()
        return {
            f"{name} MAE": float(e) / len(test_idx)
            for name, e in zip(QM9_TARGETS, errors, strict=True)
        }

    torch.manual_seed(seed)
    return Problem(
        SetTransformer(len(QM9_TARGETS)),
        batch,
        losses,
        evaluate,
        True,
        "QM9, 11 targets, set transformer dim 64 depth 4, L1 on standardized targets, "
        f"train {len(train_idx)} / test 5000 molecules",
    )


PROBLEMS = {"multifashion": multifashion_problem, "qm9": qm9_problem}


def run(
    problem_name: str, steps: int, batch_size: int, seed: int, analysis_steps: int, lr: float
) -> dict:
    problem = PROBLEMS[problem_name](batch_size, seed)
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
    after = slice(analysis_steps + 5, None)  # skip the expansion step itself
    ratio = statistics.median(times["dtme"][after]) / statistics.median(times["ew"][after])
    analysis_ratio = statistics.median(times["dtme"][analysis_steps // 10 : analysis_steps]) / (
        statistics.median(times["ew"][analysis_steps // 10 : analysis_steps])
    )
    metrics = {"ew": problem.evaluate(ew_model), "dtme": problem.evaluate(dtme_model)}
    result = {
        "problem": problem.description,
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
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--analysis-steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=Path("bench-results/dtme"))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    result = run(args.problem, args.steps, args.batch, args.seed, args.analysis_steps, args.lr)
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
