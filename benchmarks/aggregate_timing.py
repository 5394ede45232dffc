"""Mean ``aggregate`` time of every gradient strategy on a random T×P matrix.

    python -m mtlopt_bench.aggregate_timing [--tasks 10] [--dim 1000000] [--repeats 5]

Methods are timed round-robin (one call of each per round) so machine noise hits all alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import mtlopt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--dim", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    generator = torch.Generator().manual_seed(0)
    jacobian = torch.randn(args.tasks, args.dim, generator=generator)
    losses = torch.rand(args.tasks, generator=generator, dtype=torch.float64) + 0.5
    names = [n for n in mtlopt.available() if mtlopt.info(n).kind.value == "gradient"] + ["ew"]
    strategies = {n: mtlopt.create(n, num_tasks=args.tasks) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.repeats + 1):  # the first round warms up
        for name, strategy in strategies.items():
            start = time.perf_counter()
            strategy.aggregate(jacobian, losses)
            times[name].append(time.perf_counter() - start)
    print(
        f"aggregate time, T={args.tasks}, P={args.dim:.0e}, float32, 2 threads, "
        f"mean of {args.repeats} after 1 warm-up"
    )
    print("| strategy | cost class | mean aggregate time (ms) |")
    print("|---|---|---|")
    for name in sorted(names, key=lambda n: statistics.mean(times[n][1:])):
        print(
            f"| {name} | {mtlopt.info(name).cost.value} | {1e3 * statistics.mean(times[name][1:]):.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
