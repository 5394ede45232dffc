"""Bad input: clear errors raised before anything changes, or a clean skip when asked."""

from __future__ import annotations

import pytest
import torch
from conftest import SharedTrunkNet, losses_of, make_batch

import mtlopt

ALL = ["ew", "pcgrad", "mgda", "cagrad", "gradnorm"]


def _snapshot(model):
    return [p.detach().clone() for p in model.parameters()], [
        None if p.grad is None else p.grad.clone() for p in model.parameters()
    ]


def _assert_unchanged(model, snapshot):
    params, grads = snapshot
    for p, before, grad in zip(model.parameters(), params, grads, strict=True):
        assert torch.equal(p.detach(), before)
        assert (p.grad is None and grad is None) or torch.equal(p.grad, grad)


def _opt(model, name, **kwargs):
    return mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), name, **kwargs)


def _nan_gradient_losses(model, x, y, task=1):
    """Finite losses whose gradient through task `task`'s head is NaN."""
    features = model.trunk(x)
    outputs = []
    for i, head in enumerate(model.heads):
        out = head(features).squeeze(-1)
        if i == task:
            out.register_hook(lambda g: g * float("nan"))
        outputs.append(out)
    return {f"t{i}": ((o - y[:, i]) ** 2).mean() for i, o in enumerate(outputs)}


@pytest.mark.parametrize("name", ALL)
def test_nan_loss_raises_naming_the_task_and_changes_nothing(net, name):
    x, y = make_batch()
    opt = _opt(net, name)
    losses = losses_of(net, x, y)
    snapshot = _snapshot(net)
    with pytest.raises(FloatingPointError, match="task\\(s\\) depth"):
        opt.step({"seg": losses[0], "depth": losses[1] * float("nan")})
    _assert_unchanged(net, snapshot)


@pytest.mark.parametrize("name", ALL)
def test_infinite_gradient_raises_naming_the_task(net, name):
    x, y = make_batch()
    opt = _opt(net, name)
    snapshot = _snapshot(net)
    expected = "t1" if name != "ew" else "combined loss"
    with pytest.raises(FloatingPointError, match=expected):
        opt.step(_nan_gradient_losses(net, x, y))
    _assert_unchanged(net, snapshot)


@pytest.mark.parametrize("name", ALL)
def test_skip_mode_skips_the_step_and_recovers(net, name):
    x, y = make_batch()
    opt = _opt(net, name, nonfinite="skip")
    snapshot = _snapshot(net)
    info = opt.step(_nan_gradient_losses(net, x, y))
    assert info.skipped and "non-finite" in info.reason and opt.last_step.skipped
    _assert_unchanged(net, snapshot)
    opt.zero_grad()
    info = opt.step(losses_of(net, x, y))
    assert not info.skipped
    assert any(
        not torch.equal(p.detach(), b) for p, b in zip(net.parameters(), snapshot[0], strict=True)
    )


def test_wrong_number_of_losses_for_the_strategy(net):
    x, y = make_batch()
    opt = _opt(net, "mgda", num_tasks=3)
    with pytest.raises(ValueError, match="3 tasks but got 2"):
        opt.step(losses_of(net, x, y))


def test_task_count_cannot_change_between_steps(net):
    x, y = make_batch()
    opt = _opt(net, "pcgrad")
    opt.step(losses_of(net, x, y))
    with pytest.raises(ValueError, match="2 tasks"):
        opt.step(losses_of(net, x, y)[:1] * 3)


def test_non_scalar_loss(net):
    x, y = make_batch()
    opt = _opt(net, "pcgrad")
    preds = net(x)
    with pytest.raises(ValueError, match=r"'task1' has shape \(16,\)"):
        opt.step([((preds[0] - y[:, 0]) ** 2).mean(), (preds[1] - y[:, 1]) ** 2])


def test_loss_without_gradient_path(net):
    x, y = make_batch()
    opt = _opt(net, "mgda")
    losses = losses_of(net, x, y)
    with pytest.raises(ValueError, match="'b' does not require grad"):
        opt.step({"a": losses[0], "b": losses[1].detach()})


def test_one_tensor_instead_of_a_sequence(net):
    x, y = make_batch()
    with pytest.raises(TypeError, match="sequence or a dict"):
        _opt(net, "ew").step(torch.stack(losses_of(net, x, y)))


def test_no_losses(net):
    with pytest.raises(ValueError, match="no losses"):
        _opt(net, "ew").step([])


def test_not_an_optimizer_and_unknown_strategy(net):
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        mtlopt.MTLOptimizer(net.parameters(), "ew")
    with pytest.raises(KeyError, match="unknown strategy"):
        _opt(net, "nope")
    with pytest.raises(ValueError, match="nonfinite"):
        _opt(net, "ew", nonfinite="ignore")


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("case", ["identical", "zero_gradient_task"])
def test_zero_or_identical_task_gradients_give_finite_updates(name, case):
    model = SharedTrunkNet()
    x, y = make_batch()
    opt = _opt(model, name)
    losses = losses_of(model, x, y)
    if case == "identical":
        losses = [losses[0], losses[0] * 1.0]
    else:
        losses = [losses[0], 0.0 * losses[1]]
    opt.step(losses)
    for p in model.parameters():
        assert torch.isfinite(p).all()
        assert p.grad is None or torch.isfinite(p.grad).all()


def test_task_finiteness_check_survives_overflowing_sums():
    from mtlopt.finite import check_tasks

    def finite(matrix, heads):
        return [check.finite for check in check_tasks(matrix, heads)]

    matrix = torch.tensor([[3e38, 3e38], [1.0, float("nan")], [1.0, float("inf")], [1.0, -2.0]])
    assert finite(matrix, [[], [], [], []]) == [True, False, False, True]
    # A task's own gradients count too: a NaN in task 3's head, and a huge finite one in task 0's.
    heads = [[torch.tensor([3e38, 3e38])], [], [None], [torch.ones(2), torch.tensor(float("nan"))]]
    assert finite(matrix, heads) == [True, False, False, False]


@pytest.mark.parametrize("name", ["pcgrad", "mgda"])
@pytest.mark.parametrize("representation", [False, True])
def test_nonfinite_gradient_of_one_head_only_names_its_task(net, name, representation):
    """The shared rows of J are finite; only task t1's own (head) parameter gradient is NaN."""
    x, y = make_batch()
    opt = _opt(net, name)
    handle = net.heads[1].weight.register_hook(lambda g: g * float("nan"))
    snapshot = _snapshot(net)
    with pytest.raises(FloatingPointError, match="non-finite gradient for task 't1'"):
        if representation:
            features = net.trunk(x)
            opt.backward(
                {
                    f"t{i}": ((h(features).squeeze(-1) - y[:, i]) ** 2).mean()
                    for i, h in enumerate(net.heads)
                },
                features=features,
            )
        else:
            opt.step(dict(zip(["t0", "t1"], losses_of(net, x, y), strict=True)))
    handle.remove()
    _assert_unchanged(net, snapshot)


def test_zero_task_check_survives_underflowing_squares():
    from mtlopt.finite import check_tasks

    matrix = torch.tensor([[1e-30, 0.0], [0.0, 0.0], [1.0, 2.0]])
    heads = [[], [torch.zeros(3)], [torch.tensor([1e-30])]]
    assert [c.zero for c in check_tasks(matrix, heads)] == [False, True, False]
