"""A two-task example: Adam wrapped with PCGrad on a small shared-trunk network.

Prints the task losses falling, then times PCGrad against plain summed-loss training on the same
model and batches (interleaved, so machine noise hits both alike) and prints the ratio.

    python -m mtlopt_bench.example [--steps 300] [--timing-steps 100]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import mtlopt

from .scaling import Regressor


def two_task_net(inputs: int = 32) -> Regressor:
    """A shared MLP trunk (inputs → 128 → 128) and one linear head per task."""
    return Regressor(inputs, tasks=2)


def make_data(n: int = 2048, inputs: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two regression targets from partly opposed directions of the same inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, inputs, generator=g)
    a, b = torch.randn(inputs, generator=g), torch.randn(inputs, generator=g)
    y = torch.stack([torch.tanh(x @ a), torch.sin(x @ (b - 0.8 * a))], dim=1)
    return x, y


def task_losses(model: Regressor, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    preds = model(x)
    return {f"task{i}": nn.functional.mse_loss(p, y[:, i]) for i, p in enumerate(preds)}


def train(steps: int, batch: int = 128, seed: int = 0) -> None:
    torch.manual_seed(seed)
    x, y = make_data(seed=seed)
    model = two_task_net()
    opt = mtlopt.MTLOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), strategy="pcgrad")
    for step in range(steps + 1):
        idx = torch.randint(0, x.shape[0], (batch,))
        opt.zero_grad()
        info = opt.step(task_losses(model, x[idx], y[idx]))
        if step % max(1, steps // 10) == 0:
            with torch.no_grad():
                full = task_losses(model, x, y)
            cos = float(info.cosines[0, 1]) if info.cosines is not None else float("nan")
            print(
                f"step {step:4d}  "
                + "  ".join(f"{k} {float(v):.4f}" for k, v in full.items())
                + f"  cos(g0,g1) {cos:+.3f}"
            )


def time_ratio(steps: int, batch: int = 128, seed: int = 0) -> float:
    """Median per-step time of PCGrad divided by plain summed-loss Adam, measured interleaved.

    Also times the bare floor of any per-task-gradient method: one forward, one ``autograd.grad``
    per task (shared parameters and that task's head), one optimizer step, nothing else.
    """
    torch.manual_seed(seed)
    x, y = make_data(seed=seed)
    plain_model, mtl_model, floor_model = two_task_net(), two_task_net(), two_task_net()
    plain = torch.optim.Adam(plain_model.parameters(), lr=1e-3)
    wrapped = mtlopt.MTLOptimizer(torch.optim.Adam(mtl_model.parameters(), lr=1e-3), "pcgrad")
    floor = torch.optim.Adam(floor_model.parameters(), lr=1e-3)
    shared = list(floor_model.trunk.parameters())

    def plain_step(xb: torch.Tensor, yb: torch.Tensor) -> None:
        plain.zero_grad()
        sum(task_losses(plain_model, xb, yb).values()).backward()
        plain.step()

    def mtl_step(xb: torch.Tensor, yb: torch.Tensor) -> None:
        wrapped.zero_grad()
        wrapped.step(task_losses(mtl_model, xb, yb))

    def floor_step(xb: torch.Tensor, yb: torch.Tensor) -> None:
        floor.zero_grad()
        losses = list(task_losses(floor_model, xb, yb).values())
        for i, (loss, head) in enumerate(zip(losses, floor_model.heads, strict=True)):
            params = [*shared, *head.parameters()]
            grads = torch.autograd.grad(loss, params, retain_graph=i < len(losses) - 1)
            for p, g in zip(params, grads, strict=True):
                p.grad = g if p.grad is None else p.grad + g
        floor.step()

    times: dict[str, list[float]] = {"plain": [], "floor": [], "pcgrad": []}
    for step in range(steps + 10):
        idx = torch.randint(0, x.shape[0], (batch,))
        for name, fn in (("plain", plain_step), ("floor", floor_step), ("pcgrad", mtl_step)):
            start = time.perf_counter()
            fn(x[idx], y[idx])
            if step >= 10:  # warm-up
                times[name].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    ratio = median["pcgrad"] / median["plain"]
    print(
        f"median step: plain {1e3 * median['plain']:.2f} ms, floor {1e3 * median['floor']:.2f} ms, "
        f"PCGrad {1e3 * median['pcgrad']:.2f} ms; PCGrad / plain {ratio:.2f}, "
        f"PCGrad / floor {median['pcgrad'] / median['floor']:.2f}"
    )
    return ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--timing-steps", type=int, default=100)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    train(args.steps)
    time_ratio(args.timing_steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
