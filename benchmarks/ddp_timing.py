"""Step time of the wrapper's DDP path against plain DDP with summed losses, 2 gloo ranks on CPU.

Every rank runs the MultiFashion ViT (2 tasks) or the QM9 set transformer (11 tasks) on random
inputs of the benchmark's shapes, wrapped in ``DistributedDataParallel``, and times, interleaved:

* ``plain DDP``: ``sum(losses).backward()`` (DDP's bucketed all-reduce) and the optimizer step;
* ``mtlopt EW``: the wrapper with a loss strategy (one backward, one all-reduce of the gradients);
* ``T-backward floor``: what any per-task-gradient method costs at least: one ``autograd.grad``
  per task, their sum all-reduced as one flat buffer, the optimizer step;
* ``mtlopt PCGrad``: per-task gradients, one all-reduce of the T×P matrix, the combination.

    python -m mtlopt_bench.ddp_timing [--model vit|set] [--steps 30] [--batch 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import mtlopt

from .models import SetTransformer, ViT

METHODS = ("plain DDP", "mtlopt EW", "T-backward floor", "mtlopt PCGrad")


def _model_and_batch(kind: str, batch: int):
    if kind == "vit":
        model = ViT([10, 10])
        x = (torch.rand(batch, 36, 36),)
        targets = torch.randint(0, 10, (batch, 2))

        def losses(m):
            return [nn.functional.cross_entropy(o, targets[:, i]) for i, o in enumerate(m(*x))]

        return model, losses
    model = SetTransformer(11)
    atoms = torch.randint(0, 5, (batch, 29))
    atoms[:, 18:] = -1  # padding, as in QM9's 29-atom layout
    positions = torch.randn(batch, 29, 3)
    targets = torch.randn(batch, 11)

    def losses(m):
        return [(o - targets[:, i]).abs().mean() for i, o in enumerate(m(atoms, positions))]

    return model, losses


def _worker(rank: int, world: int, init: str, kind: str, steps: int, batch: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    runs = {}
    for method in METHODS:
        torch.manual_seed(0)
        model, losses = _model_and_batch(kind, batch)
        ddp = nn.parallel.DistributedDataParallel(model)
        base = torch.optim.Adam(ddp.parameters(), lr=1e-3)
        if method == "plain DDP":

            def step(ddp=ddp, base=base, losses=losses):
                base.zero_grad()
                sum(losses(ddp)).backward()
                base.step()

        elif method == "T-backward floor":

            def step(ddp=ddp, base=base, losses=losses):
                base.zero_grad()
                params = list(ddp.parameters())
                task_losses = losses(ddp)
                total = [torch.zeros_like(p) for p in params]
                for i, loss in enumerate(task_losses):
                    grads = torch.autograd.grad(
                        loss,
                        params,
                        retain_graph=i < len(task_losses) - 1,
                        allow_unused=True,
                        materialize_grads=True,
                    )
                    torch._foreach_add_(total, list(grads))
                flat = torch.cat([t.reshape(-1) for t in total])
                dist.all_reduce(flat)
                for p, piece in zip(params, flat.split([p.numel() for p in params]), strict=True):
                    p.grad = piece.view_as(p) / dist.get_world_size()
                base.step()

        else:
            opt = mtlopt.MTLOptimizer(base, "ew" if method == "mtlopt EW" else "pcgrad")

            def step(opt=opt, ddp=ddp, losses=losses):
                opt.zero_grad()
                opt.step(losses(ddp))

        runs[method] = step
    times = {m: [] for m in METHODS}
    for i in range(steps + 3):
        for method, step in runs.items():
            dist.barrier()
            start = time.perf_counter()
            step()
            if i >= 3:
                times[method].append(time.perf_counter() - start)
    if rank == 0:
        torch.save(times, out)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["vit", "set"], default="vit")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64, help="per rank")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        out = os.path.join(tmp, "times.pt")
        mp.spawn(
            _worker,
            args=(2, os.path.join(tmp, "init"), args.model, args.steps, args.batch, out),
            nprocs=2,
        )
        times = torch.load(out)
    median = {m: statistics.median(t) for m, t in times.items()}
    print(f"{args.model}, 2 gloo ranks × 1 thread, batch {args.batch} per rank, {args.steps} steps")
    print("| method | median step (ms) | / plain DDP |")
    print("|---|---|---|")
    for method in METHODS:
        ratio = median[method] / median["plain DDP"]
        print(f"| {method} | {1e3 * median[method]:.1f} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
