"""torch.distributed with tasks present on some ranks only, and a bad input on one rank."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from distributed_worker import PARTIAL, make, run_partial, train_partial

import mtlopt

TIMEOUT = 120


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    tmp = tmp_path_factory.mktemp("ddp-partial")
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        context = mp.start_processes(
            run_partial, args=(2, str(tmp / "init"), PARTIAL, str(tmp)), nprocs=2, join=False,
            start_method="spawn",
        )
        finished = False
        waited = 0
        while not finished and waited < TIMEOUT:
            finished = context.join(timeout=5)
            waited += 5
        if not finished:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the ranks did not finish within {TIMEOUT} s: one is waiting for the other")
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old
    return [torch.load(tmp / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("name", PARTIAL)
def test_a_task_present_on_some_ranks_is_averaged_over_those_ranks(ranks, name):
    model, strategy = make(name, strategy_seed=1234)
    opt = mtlopt.MTLOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), strategy,
                              tasks=["a", "b"])
    train_partial(model, opt, None, 2)
    for rank in ranks:
        for got, expected in zip(rank[name], model.parameters(), strict=True):
            torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-6)


def test_a_bad_input_on_one_rank_raises_on_every_rank_and_nobody_hangs(ranks):
    own, other = ranks[1]["bad input"], ranks[0]["bad input"]
    assert own[0].startswith("ValueError") and "shape (3,)" in own[0]
    assert other[0].startswith("ReplicaError") and "other rank" in other[0]
    assert len([e for e in own if isinstance(e, str)]) == 1
    for a, b in zip(own[1:], other[1:], strict=True):
        assert torch.equal(a, b), "the ranks diverged after the error"
