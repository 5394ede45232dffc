"""mtlopt.diagnose on models whose situation is known by construction."""

from __future__ import annotations

import torch
from conftest import SharedTrunkNet
from token_models import TinyViT

import mtlopt


def regression(scale_b: float, sign_b: float, n: int = 64):
    """Targets of task b are task a's times ``sign_b · scale_b``: opposed when sign_b < 0."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    a = x @ torch.randn(6, generator=g)
    return [
        (x[i : i + 16], torch.stack([a[i : i + 16], sign_b * scale_b * a[i : i + 16]], 1))
        for i in range(0, n, 16)
    ]


def losses(model, batch):
    x, y = batch
    out = model(x)
    return {"a": ((out[0] - y[:, 0]) ** 2).mean(), "b": ((out[1] - y[:, 1]) ** 2).mean()}


def test_opposed_tasks_of_different_scales_suggest_scale_invariant_and_conflict_methods():
    torch.manual_seed(0)
    model = SharedTrunkNet()
    # One head for both tasks at the start: the trunk's gradients then point the way the targets do.
    model.heads[1].load_state_dict(model.heads[0].state_dict())
    before = [p.detach().clone() for p in model.parameters()]
    d = mtlopt.diagnose(model, regression(scale_b=30.0, sign_b=-1.0), losses, steps=8)
    assert d.task_names == ["a", "b"] and d.losses.shape == (8, 2) and d.cosines.shape == (8, 2, 2)
    assert d.loss_ratio > 100  # squared errors of targets 30× larger
    a, b, rate = d.worst_pair()
    assert (a, b) == ("a", "b") and rate > 0.5  # the targets are opposed
    text = str(d)
    assert "Scales differ" in text and "`uw`" in text
    assert "Gradients conflict" in text and "`pcgrad`" in text
    assert d.step_seconds["loss"] > 0 and d.step_seconds["gradient"] > 0
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters(), strict=True))


def test_aligned_tasks_of_equal_scale_suggest_tuned_ew():
    torch.manual_seed(0)
    model = SharedTrunkNet()
    model.heads[1].load_state_dict(model.heads[0].state_dict())  # same head, same targets
    d = mtlopt.diagnose(model, regression(scale_b=1.0, sign_b=1.0), losses, steps=6)
    assert d.loss_ratio < 3 and d.worst_pair()[2] < 0.25
    assert "tuned EW is likely enough" in d.suggestions[-1]
    assert "tuned EW baseline" in d.suggestions[0]


def test_token_space_conflicts_are_reported_for_transformers():
    torch.manual_seed(0)
    model = TinyViT(tasks=2)
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(8, 5, 3, generator=g), torch.randn(8, 2, generator=g)) for _ in range(4)
    ]

    def vit_losses(m, batch):
        x, y = batch
        return [((o.squeeze(-1) - y[:, i]) ** 2).mean() for i, o in enumerate(m(x))]

    d = mtlopt.diagnose(model, batches, vit_losses, steps=4, tokens=True)
    assert d.task_names == ["task0", "task1"]
    assert len(d.tokens.range_rates) == 4  # one per block
    assert "Token-space conflict rates per block" in str(d)


def test_tasks_sharing_nothing_get_a_clear_error():
    import pytest

    heads = torch.nn.ModuleList([torch.nn.Linear(6, 1), torch.nn.Linear(6, 1)])
    batch = (torch.randn(4, 6), torch.randn(4, 2))

    def separate(m, b):
        return [((h(b[0]).squeeze(-1) - b[1][:, i]) ** 2).mean() for i, h in enumerate(m)]

    with pytest.raises(ValueError, match="share nothing"):
        mtlopt.diagnose(heads, [batch], separate, steps=2)
