"""Worker of DTME's DDP test: each rank trains DTME on its half of every batch (gloo)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from token_models import TinyViT, batch, losses

import mtlopt

STEPS, BATCH = 8, 8


def train(rank: int | None, world: int) -> dict:
    torch.manual_seed(0)
    model = TinyViT()
    torch.manual_seed(100 + (rank or 0))  # ranks differ in their global RNG: the seed is broadcast
    dtme = mtlopt.create("dtme", model=model, num_tasks=2, analysis_steps=6, covariance_steps=2)
    opt = mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=1e-2), dtme)
    part = (
        slice(None) if rank is None else slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    )
    for step in range(STEPS):
        x, y = batch(n=BATCH, seed=step)
        opt.zero_grad()
        opt.step(losses(model, x[part], y[part]))
    return {
        "report": dtme.report.as_dict(),
        "parameters": [p.detach().clone() for p in model.parameters()],
    }


def run(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.save(train(rank, world), f"{out}/dtme_rank{rank}.pt")
    dist.destroy_process_group()
