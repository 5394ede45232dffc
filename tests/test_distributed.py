"""DDP across processes: N ranks on their shares of each batch equal one process on the union."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from distributed_worker import BATCH, make, run, train

import mtlopt

# Loss and gradient strategies, stateful (DWA, UW, FAMO, GradNorm, GradVac, Nash-MTL, DB-MTL) and
# random (RLW, PCGrad, GradDrop) ones.
NAMES = ["ew", "uw", "dwa", "rlw", "famo", "gls", "mgda", "pcgrad", "graddrop", "gradvac"]
NAMES += ["cagrad", "nash_mtl", "gradnorm", "db_mtl", "imtl", "upgrad"]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    tmp = tmp_path_factory.mktemp("ddp")
    env = {"OMP_NUM_THREADS": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        mp.spawn(run, args=(2, str(tmp / "init"), NAMES, str(tmp)), nprocs=2, join=True)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return [torch.load(tmp / f"rank{r}.pt") for r in range(2)]


# GLS and FAMO weigh each micro-batch by the losses accumulated so far (they warn): their updates
# depend on how samples are split into micro-batches, which differs between the two runs.
CASES = [(n, m) for n in NAMES for m in (1, 2) if m == 1 or n not in ("gls", "famo")]


@pytest.mark.parametrize(("name", "micro_batches"), CASES)
def test_two_ranks_equal_one_process_on_the_union_of_the_batches(ranks, name, micro_batches):
    model, strategy = make(name, strategy_seed=1234)  # rank 0's strategy
    opt = mtlopt.MTLOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), strategy)
    train(model, opt, slice(0, BATCH), micro_batches)
    for rank in ranks:
        for got, expected in zip(rank[name, micro_batches], model.parameters(), strict=True):
            torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-6)
    for a, b in zip(ranks[0][name, micro_batches], ranks[1][name, micro_batches], strict=True):
        assert torch.equal(a, b), "the ranks diverged"


def test_representation_mode_is_refused_with_a_reason(ranks):
    for rank in ranks:
        (representation,) = rank["refused"]  # DTME runs under DDP: tests/test_dtme_ddp.py
        assert "representation mode" in representation and "not supported" in representation


def test_a_world_of_one_rank_is_not_data_parallel(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        model, _ = make("ew", 0)
        opt = mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "mgda")
        assert opt._replicas is None
    finally:
        dist.destroy_process_group()
