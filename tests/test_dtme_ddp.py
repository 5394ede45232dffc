"""DTME under data parallelism (issue 15): the analysis statistics are summed over ranks, so two
gloo ranks choose the plan of one process on the union batch, and train like it."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dtme_ddp_worker import run, train


def test_two_ranks_choose_and_train_like_one_process_on_the_union_batch(tmp_path):
    """Was: NotImplementedError, DTME under torch.distributed refused."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    mp.spawn(run, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"dtme_rank{r}.pt") for r in range(2)]
    torch.set_num_threads(1)
    single = train(None, 1)
    for rank in ranks:
        for key in ("modulation_layers", "expansion_layers", "range_ranks", "tokens_seen"):
            assert rank["report"][key] == single["report"][key], key
        for key in ("range_rates", "null_rates"):
            assert rank["report"][key] == pytest.approx(single["report"][key], abs=1e-12), key
        for p, q in zip(rank["parameters"], single["parameters"], strict=True):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    for p, q in zip(ranks[0]["parameters"], ranks[1]["parameters"], strict=True):
        assert torch.equal(p, q)
