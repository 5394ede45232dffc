"""Worker of the DDP test: each rank trains on its half of every batch, in a gloo process group."""

from __future__ import annotations

import torch
import torch.distributed as dist
from conftest import SharedTrunkNet, losses_of, make_batch
from torch import nn

import mtlopt

STEPS = 4
BATCH = 16


def options(name: str) -> dict:
    kwargs: dict = {"num_tasks": 2}
    if name == "dwa":
        kwargs["window"] = 1
    return kwargs


def train(model: nn.Module, opt: mtlopt.MTLOptimizer, part: slice, micro_batches: int) -> None:
    for step in range(STEPS):
        x, y = make_batch(n=BATCH, seed=step)
        x, y = x[part], y[part]
        opt.zero_grad()
        chunks = list(zip(x.chunk(micro_batches), y.chunk(micro_batches), strict=True))
        for cx, cy in chunks[:-1]:
            opt.backward([loss / micro_batches for loss in losses_of(model, cx, cy)])
        cx, cy = chunks[-1]

        def closure(cx=cx, cy=cy):
            return [loss / micro_batches for loss in losses_of(model, cx, cy)]

        if micro_batches == 1:
            opt.step(closure)  # FAMO learns from the re-evaluated losses
        else:
            opt.backward(closure())
            opt.step()


def make(name: str, strategy_seed: int, model_seed: int = 0):
    torch.manual_seed(model_seed)
    model = SharedTrunkNet()
    torch.manual_seed(strategy_seed)  # random strategies draw their seed from torch's generator
    strategy = mtlopt.create(name, **options(name))
    return model, strategy


def refusals() -> list[str]:
    """What the wrapper refuses under torch.distributed, with its messages."""
    messages = []
    model, _ = make("ew", 0)
    opt = mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "mgda")
    x, y = make_batch(n=4)
    features = model.trunk(x)
    losses = [
        ((head(features).squeeze(-1) - y[:, i]) ** 2).mean() for i, head in enumerate(model.heads)
    ]
    try:
        opt.backward(losses, features=features)
    except NotImplementedError as error:
        messages.append(str(error))
    return messages


def run(rank: int, world: int, init_file: str, names: list[str], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {}
    per_rank = BATCH // world
    part = slice(rank * per_rank, (rank + 1) * per_rank)
    for name in names:
        for micro_batches in (1, 2):
            # Rank 1's strategy gets another seed: the wrapper must broadcast rank 0's state.
            model, strategy = make(name, strategy_seed=1234 + rank)
            ddp = nn.parallel.DistributedDataParallel(model)
            opt = mtlopt.MTLOptimizer(torch.optim.Adam(ddp.parameters(), lr=1e-2), strategy)
            train(ddp, opt, part, micro_batches)
            results[name, micro_batches] = [p.detach().clone() for p in model.parameters()]
    results["refused"] = refusals()
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()
