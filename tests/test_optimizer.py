"""The wrapper's contract: torch.optim compatibility, untouched heads, exact resume, accumulation."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import SharedTrunkNet, losses_of, make_batch

import mtlopt

GRADIENT = ["pcgrad", "mgda", "cagrad", "gradnorm", "ew"]


def _wrap(model, name, lr=0.1, base=torch.optim.SGD, **kwargs):
    if name == "pcgrad":
        kwargs.setdefault("seed", 0)
    return mtlopt.MTLOptimizer(base(model.parameters(), lr=lr), name, **kwargs)


def test_is_a_torch_optimizer_sharing_groups_and_state(net):
    base = torch.optim.Adam(net.parameters(), lr=1e-3)
    opt = mtlopt.MTLOptimizer(base, "pcgrad")
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is base.param_groups and opt.state is base.state
    assert opt.defaults is base.defaults


@pytest.mark.parametrize("name", ["pcgrad", "mgda", "cagrad", "gradnorm"])
def test_heads_get_their_own_gradient_and_trunk_gets_the_combination(net, name):
    x, y = make_batch()
    reference = copy.deepcopy(net)
    losses = losses_of(reference, x, y)
    shared = list(reference.trunk.parameters())
    jacobian = torch.stack(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)])
            for loss in losses
        ]
    )
    head_grads = [
        torch.autograd.grad(loss, list(head.parameters()), retain_graph=True)
        for loss, head in zip(losses, reference.heads, strict=True)
    ]
    detached = torch.stack([loss.detach() for loss in losses]).double()
    expected = (mtlopt.create(name, seed=0) if name == "pcgrad" else mtlopt.create(name)).aggregate(
        jacobian, detached
    )

    opt = _wrap(net, name)
    opt.zero_grad()
    opt.backward(losses_of(net, x, y))
    got = torch.cat([p.grad.reshape(-1) for p in net.trunk.parameters()])
    torch.testing.assert_close(got, expected)
    for head, grads in zip(net.heads, head_grads, strict=True):
        for p, g in zip(head.parameters(), grads, strict=True):
            torch.testing.assert_close(p.grad, g, rtol=0, atol=0)


def test_shared_parameters_are_detected_as_those_reached_by_two_tasks(net):
    opt = _wrap(net, "mgda")
    x, y = make_batch()
    opt.backward(losses_of(net, x, y))
    assert {id(p) for p in opt._partition.shared} == {id(p) for p in net.trunk.parameters()}
    for head, specific in zip(net.heads, opt._partition.specific, strict=True):
        assert {id(p) for p in specific} == {id(p) for p in head.parameters()}


def test_explicit_shared_module_and_warning_for_missed_shared_parameters(net):
    x, y = make_batch()
    opt = _wrap(net, "mgda", shared=net.trunk)
    opt.backward(losses_of(net, x, y))
    assert len(opt._partition.shared) == 4
    first_layer_only = _wrap(net, "mgda", shared=net.trunk[0].parameters())
    with pytest.warns(UserWarning, match="reached by several tasks"):
        first_layer_only.backward(losses_of(net, x, y))


def test_loss_strategy_gradient_is_the_gradient_of_the_scalarized_loss(net):
    x, y = make_batch()
    reference = copy.deepcopy(net)
    sum(losses_of(reference, x, y)).backward()
    opt = _wrap(net, "ew")
    opt.backward(losses_of(net, x, y))
    for p, q in zip(net.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def test_scheduler_attached_to_the_wrapper_drives_the_wrapped_optimizer(net):
    base = torch.optim.SGD(net.parameters(), lr=1.0)
    opt = mtlopt.MTLOptimizer(base, "pcgrad")
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = make_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for _ in range(3):
            opt.zero_grad()
            opt.step(losses_of(net, x, y))
            scheduler.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.125)


def test_clipping_between_backward_and_step_is_applied(net):
    x, y = make_batch()
    opt = _wrap(net, "pcgrad", lr=1.0)
    before = [p.detach().clone() for p in net.parameters()]
    opt.zero_grad()
    opt.backward(losses_of(net, x, y))
    torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm=1e-3)
    clipped = [p.grad.clone() for p in net.parameters()]
    opt.step()
    total = torch.cat([g.reshape(-1) for g in clipped]).norm()
    assert total == pytest.approx(1e-3, rel=1e-4)
    for p, b, g in zip(net.parameters(), before, clipped, strict=True):
        torch.testing.assert_close(p.detach(), b - g)


def test_add_param_group_reaches_the_wrapped_optimizer(net):
    opt = _wrap(net, "ew")
    extra = torch.nn.Parameter(torch.ones(3))
    opt.add_param_group({"params": [extra], "lr": 0.5})
    assert opt.optimizer.param_groups[-1]["params"][0] is extra
    x, y = make_batch()
    opt.zero_grad()
    opt.step([loss + extra.sum() for loss in losses_of(net, x, y)])
    torch.testing.assert_close(extra.detach(), torch.full((3,), 1 - 0.5 * 2))


@pytest.mark.parametrize("name", GRADIENT)
def test_state_dict_round_trip_continues_bit_for_bit(name):
    def train(model, opt, steps, seed):
        for s in range(steps):
            x, y = make_batch(seed=seed + s)
            opt.zero_grad()
            opt.step(losses_of(model, x, y))

    torch.manual_seed(1)
    model = SharedTrunkNet()
    opt = _wrap(model, name, lr=1e-2, base=torch.optim.Adam)
    train(model, opt, 5, seed=0)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    train(model, opt, 5, seed=100)

    torch.manual_seed(999)  # a different global RNG state must not matter
    fresh = SharedTrunkNet()
    fresh.load_state_dict(saved_model)
    fresh_opt = _wrap(
        fresh, name, lr=1e-2, base=torch.optim.Adam, **({"seed": 7} if name == "pcgrad" else {})
    )
    fresh_opt.load_state_dict(saved_opt)
    train(fresh, fresh_opt, 5, seed=100)
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)


def test_load_state_dict_rejects_a_plain_optimizer_state(net):
    opt = _wrap(net, "ew")
    with pytest.raises(KeyError, match="MTLOptimizer"):
        opt.load_state_dict(torch.optim.SGD(net.parameters(), lr=1).state_dict())


@pytest.mark.parametrize("name", GRADIENT)
def test_accumulating_micro_batches_equals_one_batch(name):
    """Per-task gradients are accumulated and combined once: 2 × 8 samples equal 1 × 16."""
    torch.manual_seed(3)
    one, two = SharedTrunkNet(), None
    two = copy.deepcopy(one)
    x, y = make_batch(n=16, seed=5)
    opt_one = _wrap(one, name, base=torch.optim.Adam, lr=1e-2)
    opt_two = _wrap(two, name, base=torch.optim.Adam, lr=1e-2)
    for _ in range(3):
        opt_one.zero_grad()
        opt_one.step(losses_of(one, x, y))
        opt_two.zero_grad()
        for half in (slice(0, 8), slice(8, 16)):
            opt_two.backward([loss / 2 for loss in losses_of(two, x[half], y[half])])
        opt_two.step()
    for p, q in zip(one.parameters(), two.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_step_with_a_closure_and_dict_losses(net):
    x, y = make_batch()
    opt = _wrap(net, "mgda")
    info = opt.step(lambda: {"left": losses_of(net, x, y)[0], "right": losses_of(net, x, y)[1]})
    assert info.task_names == ["left", "right"] and opt.task_names == ["left", "right"]
    assert set(info.as_dict()) >= {"loss/left", "weight/right", "cos/left~right", "grad_norm/left"}


def test_diagnostics_match_the_task_gradients(net):
    x, y = make_batch()
    reference = copy.deepcopy(net)
    losses = losses_of(reference, x, y)
    grads = [
        torch.cat(
            [
                g.reshape(-1)
                for g in torch.autograd.grad(
                    loss, list(reference.trunk.parameters()), retain_graph=True
                )
            ]
        )
        for loss in losses
    ]
    opt = _wrap(net, "pcgrad")
    info = opt.step(losses_of(net, x, y))
    cosine = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert float(info.cosines[0, 1]) == pytest.approx(float(cosine), rel=1e-5)
    assert float(info.gradient_norms[1]) == pytest.approx(float(grads[1].norm()), rel=1e-5)
    assert opt.last_step is info
    assert float(info.losses[0]) == pytest.approx(float(losses[0].detach()))


def test_expanded_autograd_gradients_are_safe_to_accumulate_into():
    """The gradient of a sum is an expanded (stride-0) tensor; it must not become .grad as is."""
    w, v = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = mtlopt.MTLOptimizer(torch.optim.SGD([w, v], lr=0.1), "pcgrad", seed=0)
    for _ in range(2):  # two micro-batches: the second adds into the first's .grad in place
        opt.backward([w.sum() + v.sum(), (2 * w).sum()])
    assert v.grad.is_contiguous() and torch.equal(v.grad, torch.full((3,), 2.0))
    opt.step()
    torch.testing.assert_close(v.detach(), torch.full((3,), 0.8))


def test_in_place_clipping_between_micro_batches_is_kept():
    """The shared .grad must not alias the wrapper's record of what it wrote: clipping it in place
    after one micro-batch must survive the next one (grad = clipped + new contribution)."""
    import numpy as np

    class Summing(mtlopt.GramianStrategy):  # linear: combine(J1 + J2) − combine(J1) = Σ rows of J2
        info = mtlopt.info("ew")

        def weigh(self, gramian, losses):
            return np.ones(len(gramian)), lambda: None

    torch.manual_seed(0)
    model = SharedTrunkNet()
    opt = mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), Summing())
    x, y = make_batch(n=16, seed=3)
    opt.zero_grad()
    opt.backward(losses_of(model, x[:8], y[:8]))
    for p in model.trunk.parameters():
        p.grad.mul_(0.5)  # what clip_grad_norm_ does
    clipped = [p.grad.clone() for p in model.trunk.parameters()]
    reference = copy.deepcopy(model)
    second = torch.autograd.grad(
        sum(losses_of(reference, x[8:], y[8:])), list(reference.trunk.parameters())
    )
    opt.backward(losses_of(model, x[8:], y[8:]))
    for p, c, g in zip(model.trunk.parameters(), clipped, second, strict=True):
        torch.testing.assert_close(p.grad, c + g)


def test_parameters_handed_the_same_gradient_tensor_accumulate_separately():
    """For (a + b)·w, autograd gives a and b the very same gradient tensor; accumulating a second
    micro-batch must not add it twice through shared storage."""
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    head = torch.nn.Parameter(torch.ones(1))
    w = torch.tensor([1.0, 2.0, 3.0])
    opt = mtlopt.MTLOptimizer(torch.optim.SGD([a, b, head], lr=0.1), "ew")
    for _ in range(2):
        shared = ((a + b) * w).sum()  # one addition: its backward passes one tensor to a and b
        opt.backward([shared * head, shared])
    torch.testing.assert_close(a.grad, 2 * 2 * w)
    torch.testing.assert_close(b.grad, 2 * 2 * w)


def test_step_takes_a_closure_by_keyword_as_torch_optim_does(net):
    """``torch.optim.Optimizer.step(closure=...)`` is how frameworks call it."""
    x, y = make_batch()
    opt = _wrap(net, "mgda")
    before = [p.detach().clone() for p in net.parameters()]
    opt.zero_grad()
    info = opt.step(closure=lambda: losses_of(net, x, y))
    assert info is not None and any(
        not torch.equal(p, q) for p, q in zip(net.parameters(), before, strict=True)
    )
    with pytest.raises(TypeError, match="not both"):
        opt.step(losses_of(net, x, y), closure=lambda: losses_of(net, x, y))
