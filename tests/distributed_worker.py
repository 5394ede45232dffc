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
    try:
        mtlopt.create("dtme", blocks=[nn.Identity()], num_tasks=2)
        mtlopt.MTLOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            mtlopt.create("dtme", blocks=[nn.Identity()], num_tasks=2),
        )
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


# Tasks present on some ranks only, and a bad input on one rank ------------------------------------
PARTIAL = ["ew", "uw", "dwa", "gls", "mgda", "pcgrad", "upgrad", "nash_mtl", "gradnorm", "db_mtl"]


def partial_losses(model: nn.Module, x, y, has_b: bool) -> dict:
    """Task 'a' everywhere; task 'b' only where ``has_b``."""
    a, b = model(x)
    return {"a": ((a - y[:, 0]) ** 2).mean(), "b": ((b - y[:, 1]) ** 2).mean() if has_b else None}


def train_partial(model: nn.Module, opt: mtlopt.MTLOptimizer, rank: int | None, world: int) -> None:
    """Step s: rank 1 has no labels for 'b' on odd steps. ``rank=None`` is the single process on
    the union: 'a' over the whole batch, 'b' over the ranks that have it."""
    per_rank = BATCH // world
    for step in range(STEPS):
        x, y = make_batch(n=BATCH, seed=step)
        ranks_with_b = [r for r in range(world) if not (r == 1 and step % 2)]
        opt.zero_grad()
        if rank is None:
            a = partial_losses(model, x, y, True)["a"]
            rows = torch.cat([torch.arange(r * per_rank, (r + 1) * per_rank) for r in ranks_with_b])
            b = partial_losses(model, x[rows], y[rows], True)["b"]
            opt.step({"a": a, "b": b})
        else:
            part = slice(rank * per_rank, (rank + 1) * per_rank)
            opt.step(partial_losses(model, x[part], y[part], rank in ranks_with_b))


def bad_input_on_one_rank(rank: int) -> list[str]:
    """Rank 1 passes a non-scalar loss on step 1: every rank must raise (none waits forever), and
    training goes on identically afterwards when both catch the error."""
    model, _ = make("ew", 0)
    opt = mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "pcgrad", seed=0)
    errors = []
    for step in range(3):
        x, y = make_batch(n=8, seed=step)
        losses = partial_losses(model, x, y, True)
        if step == 1 and rank == 1:
            losses["a"] = losses["a"].expand(3)
        opt.zero_grad()
        try:
            opt.step(losses)
        except (ValueError, RuntimeError) as error:
            errors.append(f"{type(error).__name__}: {error}")
    return [*errors, *(p.detach().clone() for p in model.parameters())]


def run_partial(rank: int, world: int, init_file: str, names: list[str], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results: dict = {}
    for name in names:
        model, strategy = make(name, strategy_seed=1234 + rank)
        opt = mtlopt.MTLOptimizer(
            torch.optim.Adam(model.parameters(), lr=1e-2), strategy, tasks=["a", "b"]
        )
        train_partial(model, opt, rank, world)
        results[name] = [p.detach().clone() for p in model.parameters()]
    results["bad input"] = bad_input_on_one_rank(rank)
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()
