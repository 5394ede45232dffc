"""Sparse training (arXiv 2411.18615): only the selected shared entries move, the mask is chosen
once by the per-neuron top fraction of |∇ Σ L_t| (checked by brute force), and it composes with
any gradient strategy."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import SharedTrunkNet, losses_of, make_batch

import mtlopt


def _brute_force_mask(model: SharedTrunkNet, x, y, density: float) -> list[torch.Tensor]:
    """Per row of each trunk tensor, the ceil(density · row) entries of largest |∂ΣL/∂θ|."""
    total = sum(losses_of(model, x, y))
    grads = torch.autograd.grad(total, list(model.trunk.parameters()))
    masks = []
    for g in grads:
        rows = g.abs().reshape(g.shape[0], -1) if g.dim() >= 2 else g.abs().reshape(1, -1)
        keep = max(1, math.ceil(density * rows.shape[1]))
        mask = torch.zeros_like(rows, dtype=torch.bool)
        for r in range(rows.shape[0]):
            order = sorted(range(rows.shape[1]), key=lambda c: -float(rows[r, c]))
            for c in order[:keep]:
                mask[r, c] = True
        masks.append(mask.reshape(g.shape))
    return masks


@pytest.mark.parametrize("base", ["ew", "pcgrad", "mgda"])
def test_only_the_selected_entries_move_and_heads_train_in_full(base):
    torch.manual_seed(0)
    model = SharedTrunkNet()
    x, y = make_batch()
    expected = _brute_force_mask(copy.deepcopy(model), x, y, 0.25)
    before = [p.detach().clone() for p in model.trunk.parameters()]
    heads = [p.detach().clone() for p in model.heads.parameters()]
    kwargs = {"seed": 0} if base == "pcgrad" else {}
    strategy = mtlopt.create("sparse_mtl", base=base, density=0.25, **kwargs)
    opt = mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), strategy)
    for step in range(3):
        opt.zero_grad()
        opt.step(losses_of(model, *make_batch(seed=step) if step else (x, y)))
    for p, p0, m in zip(model.trunk.parameters(), before, expected, strict=True):
        moved = p.detach() != p0
        assert not (moved & ~m).any(), "an unselected entry moved"
        assert moved[m].float().mean() > 0.9
    assert all(not torch.equal(p, h) for p, h in zip(model.heads.parameters(), heads, strict=True))


def test_the_masked_update_is_the_base_update_times_the_mask():
    """On a random J: direction = M ⊙ base(J), with M the top fraction of |1ᵀJ|."""
    g = torch.Generator().manual_seed(3)
    jacobian = torch.randn(3, 40, generator=g, dtype=torch.float64)
    direction = mtlopt.create("sparse_mtl", base="upgrad", density=0.3).aggregate(jacobian)
    reference = mtlopt.create("upgrad").aggregate(jacobian)
    score = jacobian.sum(0).abs()
    top = set(torch.argsort(score, descending=True)[:12].tolist())
    for c in range(40):
        assert float(direction[c]) == (float(reference[c]) if c in top else 0.0)


def test_a_given_mask_is_applied_and_saved():
    torch.manual_seed(0)
    model = SharedTrunkNet()
    first = model.trunk[0].weight
    given = torch.zeros_like(first, dtype=torch.bool)
    given[0] = True
    before = {n: p.detach().clone() for n, p in model.trunk.named_parameters()}
    opt = mtlopt.MTLOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), "sparse_mtl", mask={first: given}
    )
    x, y = make_batch()
    opt.step(losses_of(model, x, y))
    moved = first.detach() != before["0.weight"]
    assert moved[0].all() and not moved[1:].any()
    assert not torch.equal(model.trunk[2].weight, before["2.weight"])  # unlisted: in full
    state = opt.state_dict()["strategy"]
    assert state["mask"].sum() == first.shape[1] + sum(
        p.numel() for n, p in model.trunk.named_parameters() if n != "0.weight"
    )


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="density"):
        mtlopt.create("sparse_mtl", density=0.0)
    with pytest.raises(TypeError, match="loss strategy"):
        mtlopt.create("sparse_mtl", base="uw")
