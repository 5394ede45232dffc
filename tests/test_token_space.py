"""Token taps and range/null-space statistics, against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from token_models import MODELS, TinyViT, batch, losses

from mtlopt.tokens import (
    ConflictCounts,
    TokenSpace,
    TokenTaps,
    analyze_token_conflicts,
    find_blocks,
    split_rank,
)


@pytest.mark.parametrize("r, expected", [(1, 1), (10, 2), (100, 3), (1000, 4)])
def test_split_rank_ratio_rule(r, expected):
    """λ = 9, 0.9, 0.09, 0.01: the range holds ≥ r times the null energy from m = expected on."""
    assert split_rank(np.array([9.0, 0.9, 0.09, 0.01]), r) == expected


def test_split_rank_absolute_rule():
    assert split_rank(np.array([9.0, 0.9, 0.09, 0.01]), 9.5, rule="absolute") == 2


def test_projection_and_conflict_rates_by_hand():
    """Covariance diag(4, 1) with r = 1: range = e1, null = e2. Three tokens, two tasks."""
    space = TokenSpace.from_covariance(np.diag([4.0, 1.0]), r=1.0)
    assert space.rank == 1
    np.testing.assert_allclose(np.abs(space.range_basis[:, 0]), [1.0, 0.0])
    g1 = torch.tensor([[[1.0, 1.0], [1.0, -1.0], [0.0, 2.0]]])  # [B=1, N=3, p=2]
    g2 = torch.tensor([[[2.0, -1.0], [-1.0, -1.0], [3.0, 1.0]]])
    range_coords, null_coords = space.project(g1)
    np.testing.assert_allclose(np.abs(range_coords[0, :, 0].numpy()), [1.0, 1.0, 0.0])
    np.testing.assert_allclose(np.abs(null_coords[0, :, 0].numpy()), [1.0, 1.0, 2.0])
    counts = ConflictCounts(num_layers=1, num_tasks=2)
    counts.add([space], [[g1], [g2]])
    range_rate, null_rate = counts.rates()
    # range dots: 2, -1 and, at token 3, task 1's projection is 0: not counted (no information,
    # as in an empty space) → 1 conflict in 2; null dots: -1, 1, 2 → 1 conflict in 3
    assert range_rate[0] == pytest.approx(1 / 2) and null_rate[0] == pytest.approx(1 / 3)
    pair_range, _ = counts.pair_rates()
    assert pair_range[0, 0, 1] == pytest.approx(1 / 2) and pair_range[0, 0, 0] == 0


def test_empty_null_space_has_no_conflicts():
    space = TokenSpace.from_covariance(np.diag([1.0, 1.0]), r=100.0)
    assert space.rank == 2
    counts = ConflictCounts(1, 2)
    counts.add([space], [[torch.ones(1, 2, 2)], [-torch.ones(1, 2, 2)]])
    range_rate, null_rate = counts.rates()
    assert range_rate[0] == 1.0 and null_rate[0] == 0.0


@pytest.mark.parametrize("name", list(MODELS))
def test_blocks_are_found_and_tapped(name):
    model = MODELS[name]()
    blocks = find_blocks(model)
    assert len(blocks) == 4
    x, _ = batch()
    with TokenTaps(blocks) as taps:
        model(x)
        captured = taps.captured()
    assert [t.shape for t in captured] == [torch.Size([8, 5, 16])] * 4
    assert all(len(b._forward_pre_hooks) == 0 for b in blocks)


def test_find_blocks_errors():
    with pytest.raises(ValueError, match="could not find the blocks"):
        find_blocks(torch.nn.Linear(2, 2))
    layer = torch.nn.TransformerEncoderLayer(8, 2, batch_first=False)
    assert find_blocks([layer]) == [layer]  # sequence-first layers are supported (issue 15)


def test_taps_reject_blocks_without_token_inputs():
    blocks = torch.nn.ModuleList([torch.nn.Linear(3, 3)])
    with TokenTaps(blocks), pytest.raises(ValueError, match=r"\[B, N, p\]"):
        blocks[0](torch.randn(4, 3))


def test_diagnostic_leaves_the_model_unchanged_and_plots(tmp_path):
    torch.manual_seed(0)
    model = TinyViT(tasks=3)
    batches = [batch(tasks=3, seed=s) for s in range(3)]
    before = [o.detach() for o in model(batches[0][0])]
    report = analyze_token_conflicts(model, batches, lambda b: losses(model, *b), num_tasks=3)
    after = model(batches[0][0])
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b.detach())
    assert all(len(b._forward_pre_hooks) == 0 for b in model.blocks)
    assert len(report.range_rates) == 4 and all(0 <= v <= 1 for v in report.range_rates)
    assert report.tokens_seen == [3 * 8 * 5] * 4
    np.testing.assert_allclose(np.array(report.pair_range_rates)[0, 0, 0], 0.0)
    report.plot(tmp_path / "conflicts.png")
    assert (tmp_path / "conflicts.png").stat().st_size > 1000
    assert "| layer |" in report.to_markdown()
