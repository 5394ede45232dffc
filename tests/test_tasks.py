"""Tasks are names, a task may be absent from a step, and no task's gradient is silently dropped."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from conftest import SharedTrunkNet, make_batch
from strategies_under_test import by_name_only, drive, gradient_strategies, make
from torch import nn

import mtlopt

GRADIENT = [n for n in gradient_strategies() if n != "ew"]
STATEFUL_LOSS = ["uw", "dwa", "famo", "imtl_l", "rlw"]


def _named_losses(model: SharedTrunkNet, x, y, names=("a", "b", "c")) -> dict[str, torch.Tensor]:
    return {n: ((p - y[:, i]) ** 2).mean() for i, (n, p) in enumerate(zip(names, model(x), strict=False))}


def _jacobian(losses: list[torch.Tensor], params: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])
            for loss in losses
        ]
    )


def _seen_by(strategy, losses: list[torch.Tensor]) -> list[torch.Tensor]:
    """The losses as the strategy differentiates them (IMTL scales them by its learned e^s)."""
    return [strategy.transform_loss(i, loss) for i, loss in enumerate(losses)]


def _wrap(model, name, **kwargs):
    strategy = make(name) if name in {"pcgrad", "gradvac", "graddrop", "rlw"} else name
    return mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), strategy, **kwargs)


# Tasks by name -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["uw", "dwa", "famo", "gradnorm", "gradvac", "nash_mtl", "imtl"])
def test_per_task_state_follows_the_name_whatever_the_order(name):
    """Two runs on the same batches, one passing the dict in reversed order every other step,
    end with the same parameters and the same strategy state."""
    runs = []
    for reverse in (False, True):
        torch.manual_seed(0)
        model = SharedTrunkNet(tasks=3)
        opt = _wrap(model, name, **({"window": 1} if name == "dwa" else {}))
        for step in range(6):
            x, y = make_batch(tasks=3, seed=step)
            # Different loss scales make per-task state differ between tasks.
            named = _named_losses(model, x, y).items()
            losses = {k: v * s for (k, v), s in zip(named, (1, 5, 25), strict=True)}
            if reverse and step % 2:
                losses = dict(reversed(list(losses.items())))
            opt.zero_grad()
            opt.step((lambda losses=losses: losses) if name == "famo" else losses)
        runs.append((copy.deepcopy(model.state_dict()), opt.strategy.state_dict()))
    for key, value in runs[0][0].items():
        torch.testing.assert_close(runs[1][0][key], value, rtol=0, atol=0)
    assert repr(runs[0][1]) == repr(runs[1][1])


def test_an_unknown_task_name_is_an_error_that_lists_the_known_ones(net):
    x, y = make_batch()
    opt = _wrap(net, "mgda")
    opt.step(_named_losses(net, x, y, names=("a", "b")))
    with pytest.raises(KeyError, match=r"'c'.*'a', 'b'"):
        opt.step(_named_losses(net, x, y, names=("a", "c")))


def test_tasks_argument_fixes_the_names_and_a_list_follows_its_order(net):
    x, y = make_batch()
    opt = _wrap(net, "uw", tasks=["seg", "depth"])
    assert opt.task_names == ["seg", "depth"]
    assert len(opt.strategy.parameters()) == 2  # built at construction: a scheduler sees them
    losses = _named_losses(net, x, y, names=("seg", "depth"))
    opt.zero_grad()
    info = opt.step([losses["seg"], losses["depth"]])
    assert set(info.as_dict()) >= {"loss/seg", "loss/depth", "weight/seg"}


# Every name is one string -------------------------------------------------------------------------
@pytest.mark.parametrize("name", by_name_only())
def test_every_strategy_is_one_string_away(name):
    """No strategy needs more than its name: those sized by the task count are built at the
    first step and their parameters join the wrapped optimizer then."""
    model = SharedTrunkNet(tasks=3)
    opt = mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), name)
    x, y = make_batch(tasks=3)
    opt.zero_grad()
    drive(opt, lambda: _named_losses(model, x, y))
    assert opt.task_names == ["a", "b", "c"]
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in trained for p in opt.strategy.parameters())


# Nothing dropped ----------------------------------------------------------------------------------
def test_a_constant_placeholder_loss_is_an_error_naming_the_task(net):
    x, y = make_batch()
    opt = _wrap(net, "pcgrad")
    before = copy.deepcopy(net.state_dict())
    losses = _named_losses(net, x, y, names=("a", "b"))
    losses["b"] = torch.zeros((), requires_grad=True)
    with pytest.raises(ValueError, match=r"'b' reaches no parameter.*pass None"):
        opt.step(losses)
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert opt.task_names is None  # a failed first call fixes nothing


@pytest.mark.parametrize("name", ["ew", "uw", "pcgrad", "mgda"])
def test_a_loss_from_another_model_is_an_error(net, name):
    other = SharedTrunkNet()
    x, y = make_batch()
    losses = _named_losses(net, x, y, names=("a", "b"))
    losses["b"] = ((other(x)[1] - y[:, 1]) ** 2).mean()
    with pytest.raises(ValueError, match="'b' reaches no parameter"):
        _wrap(net, name).step(losses)


@pytest.mark.parametrize("name", GRADIENT)
def test_a_task_absent_from_the_first_step_is_trained_once_present(name):
    """Step 1 has task 'b' absent (``None``); on step 2 the trunk receives the strategy's
    combination of both tasks and b's head its own gradient (the partition is not frozen)."""
    model = SharedTrunkNet()
    opt = _wrap(model, name)
    x, y = make_batch()
    opt.zero_grad()
    opt.step({"a": ((model(x)[0] - y[:, 0]) ** 2).mean(), "b": None})
    assert all(p.grad is None for p in model.heads[1].parameters())

    reference = copy.deepcopy(model)
    strategy = copy.deepcopy(opt.strategy)
    losses = _seen_by(strategy, [((p - y[:, i]) ** 2).mean() for i, p in enumerate(reference(x))])
    trunk = list(reference.trunk.parameters())
    # The trunk was task a's own on step 1: it is newly shared (DB-MTL's EMA starts at zero).
    strategy.remap_columns(torch.full((sum(p.numel() for p in trunk),), -1))
    expected = strategy.aggregate(_jacobian(losses, trunk), torch.stack(losses).detach().double())
    head_b = torch.autograd.grad(losses[1], list(reference.heads[1].parameters()))

    opt.zero_grad()
    opt.backward(dict(zip("ab", [((p - y[:, i]) ** 2).mean() for i, p in enumerate(model(x))], strict=True)))
    got = torch.cat([p.grad.reshape(-1) for p in model.trunk.parameters()])
    torch.testing.assert_close(got, expected)
    for p, g in zip(model.heads[1].parameters(), head_b, strict=True):
        torch.testing.assert_close(p.grad, g)


class _Growing(nn.Module):
    """Task b reaches ``late`` only once ``use_late`` is set: ``late`` then becomes shared."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(4, 6)
        self.late = nn.Linear(6, 6)
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(2))
        self.use_late = False

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        a = self.heads[0](torch.tanh(self.late(h)))
        b = self.heads[1](torch.tanh(self.late(h)) if self.use_late else h)
        return a.squeeze(-1), b.squeeze(-1)


@pytest.mark.parametrize("name", GRADIENT)
def test_a_parameter_that_becomes_shared_receives_the_combination(name):
    torch.manual_seed(0)
    model = _Growing()
    opt = _wrap(model, name)
    x, y = torch.randn(16, 4), torch.randn(16, 2)

    def losses(m):
        return [((p - y[:, i]) ** 2).mean() for i, p in enumerate(m(x))]

    for _ in range(2):
        opt.zero_grad()
        opt.step(dict(zip("ab", losses(model), strict=True)))
    model.use_late = True
    reference, strategy = copy.deepcopy(model), copy.deepcopy(opt.strategy)
    ref_losses = _seen_by(strategy, losses(reference))
    shared = [*reference.trunk.parameters(), *reference.late.parameters()]
    trunk_columns = sum(p.numel() for p in reference.trunk.parameters())
    late_columns = sum(p.numel() for p in reference.late.parameters())
    strategy.remap_columns(torch.cat([torch.arange(trunk_columns),
                                      torch.full((late_columns,), -1)]))
    expected = strategy.aggregate(
        _jacobian(ref_losses, shared), torch.stack(ref_losses).detach().double()
    )
    opt.zero_grad()
    opt.backward(dict(zip("ab", losses(model), strict=True)))
    got = torch.cat([p.grad.reshape(-1) for p in [*model.trunk.parameters(),
                                                  *model.late.parameters()]])
    torch.testing.assert_close(got, expected)


def test_a_parameter_that_becomes_shared_in_the_middle_of_accumulation():
    """Micro-batch 1 has task a only (late is a's own), micro-batch 2 makes late shared: the
    window's sums of both micro-batches are combined as one batch would be."""
    torch.manual_seed(0)
    model = _Growing()
    model.use_late = True
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    reference = copy.deepcopy(model)
    shared = [*reference.trunk.parameters(), *reference.late.parameters()]
    first = ((reference(x[:8])[0] - y[:8, 0]) ** 2).mean()
    second = [((p - y[8:, i]) ** 2).mean() for i, p in enumerate(reference(x[8:]))]
    rows = _jacobian(second, shared)
    rows[0] += _jacobian([first], shared)[0]
    expected = mtlopt.create("mgda").aggregate(rows)

    opt = _wrap(model, "mgda")
    opt.zero_grad()
    opt.backward({"a": ((model(x[:8])[0] - y[:8, 0]) ** 2).mean(), "b": None})
    second = [((p - y[8:, i]) ** 2).mean() for i, p in enumerate(model(x[8:]))]
    opt.backward(dict(zip("ab", second, strict=True)))
    got = torch.cat([p.grad.reshape(-1) for p in [*model.trunk.parameters(),
                                                  *model.late.parameters()]])
    torch.testing.assert_close(got, expected)


# Absent tasks ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", GRADIENT)
def test_gradient_strategies_combine_the_present_rows(name):
    model = SharedTrunkNet(tasks=3)
    opt = _wrap(model, name)
    x, y = make_batch(tasks=3)
    opt.zero_grad()
    opt.step(_named_losses(model, x, y))  # fixes tasks a, b, c
    reference, strategy = copy.deepcopy(model), copy.deepcopy(opt.strategy)
    all_losses = _named_losses(reference, x, y)
    losses = [all_losses["a"], all_losses["c"]]
    trunk = list(reference.trunk.parameters())
    with strategy.restricted_to(np.array([0, 2])):
        losses = _seen_by(strategy, losses)
        expected = strategy.aggregate(_jacobian(losses, trunk), torch.stack(losses).detach().double())

    opt.zero_grad()
    step = _named_losses(model, x, y)
    info = opt.backward({"a": step["a"], "b": None, "c": step["c"]})
    got = torch.cat([p.grad.reshape(-1) for p in model.trunk.parameters()])
    torch.testing.assert_close(got, expected)
    assert all(p.grad is None for p in model.heads[1].parameters())
    assert info.present == ["a", "c"] and np.isnan(float(info.losses[1]))


@pytest.mark.parametrize(
    ("name", "attribute"),
    [("dwa", "_history"), ("famo", "logits"), ("gradnorm", "weights"), ("gradvac", "targets"),
     ("nash_mtl", "_alpha"), ("db_mtl", "ema")],
)
def test_an_absent_task_state_is_not_advanced(name, attribute):
    model = SharedTrunkNet(tasks=3)
    opt = _wrap(model, name, **({"window": 1} if name == "dwa" else {}))
    for step in range(3):
        x, y = make_batch(tasks=3, seed=step)
        opt.zero_grad()
        opt.step(lambda x=x, y=y: {k: v * (4 if k == "b" else 1)
                                   for k, v in _named_losses(model, x, y).items()})
    before = copy.deepcopy(getattr(opt.strategy, attribute))
    for step in range(3):
        x, y = make_batch(tasks=3, seed=10 + step)
        opt.zero_grad()
        opt.step(lambda x=x, y=y: {**_named_losses(model, x, y), "b": None})
    after = getattr(opt.strategy, attribute)
    as_array = (lambda v: v.numpy()) if isinstance(after, torch.Tensor) else np.asarray
    b_before, b_after = as_array(before)[1], as_array(after)[1]
    np.testing.assert_array_equal(b_after, b_before)
    assert not np.array_equal(as_array(after)[0], as_array(before)[0])
    if attribute == "targets":
        np.testing.assert_array_equal(as_array(after)[:, 1], as_array(before)[:, 1])


@pytest.mark.parametrize("name", ["uw", "imtl_l", "imtl"])
def test_an_absent_task_learned_value_gets_no_gradient(name):
    model = SharedTrunkNet(tasks=3)
    opt = mtlopt.MTLOptimizer(torch.optim.Adam(model.parameters(), lr=0.05), name)
    x, y = make_batch(tasks=3)
    for _ in range(2):
        opt.zero_grad()
        opt.step(_named_losses(model, x, y))
    value_b = opt.strategy.parameters()[1].detach().clone()
    for _ in range(3):
        opt.zero_grad()
        opt.step({**_named_losses(model, x, y), "b": None})
        assert opt.strategy.parameters()[1].grad is None
    # Adam's momentum would move it on a zero gradient: no gradient leaves it exactly where it was.
    assert torch.equal(opt.strategy.parameters()[1].detach(), value_b)


def test_loss_weightings_renormalise_over_the_present_tasks(net):
    model = SharedTrunkNet(tasks=3)
    opt = _wrap(model, "dwa")
    x, y = make_batch(tasks=3)
    opt.zero_grad()
    info = opt.step({**_named_losses(model, x, y), "b": None})
    weights = info.weights.numpy()
    np.testing.assert_allclose(weights[[0, 2]].sum(), 2.0)  # T counts the present tasks
    assert np.isnan(weights[1])


@pytest.mark.parametrize("name", ["mgda", "pcgrad", "upgrad", "ew"])
def test_accumulation_with_a_task_present_in_some_micro_batches(name):
    """A task labelled in micro-batch 2 only: its row is its micro-batch-2 gradient, the others
    sum over both micro-batches, and the strategy combines those rows once."""
    model = SharedTrunkNet(tasks=3)
    x, y = make_batch(tasks=3, n=16)
    reference = copy.deepcopy(model)
    trunk = list(reference.trunk.parameters())
    first, second = _named_losses(reference, x[:8], y[:8]), _named_losses(reference, x[8:], y[8:])
    rows = _jacobian([second["a"], second["b"], second["c"]], trunk)
    rows[[0, 2]] += _jacobian([first["a"], first["c"]], trunk)
    strategy = make(name)
    expected = strategy.aggregate(rows, torch.ones(3, dtype=torch.float64))

    opt = _wrap(model, name)
    opt.zero_grad()
    opt.backward({**_named_losses(model, x[:8], y[:8]), "b": None})
    opt.backward(_named_losses(model, x[8:], y[8:]))
    got = torch.cat([p.grad.reshape(-1) for p in model.trunk.parameters()])
    torch.testing.assert_close(got, expected)


def test_masked_mean_is_none_without_labelled_samples():
    per_sample = torch.tensor([1.0, float("nan"), 3.0], requires_grad=True)
    assert mtlopt.masked_mean(per_sample, torch.zeros(3, dtype=torch.bool)) is None
    mean = mtlopt.masked_mean(per_sample, torch.tensor([True, False, True]))
    assert float(mean) == 2.0
    mean.backward()
    torch.testing.assert_close(per_sample.grad, torch.tensor([0.5, 0.0, 0.5]))


def test_a_zero_gradient_placeholder_is_warned_about_once(net):
    x, y = make_batch()
    opt = _wrap(net, "mgda")
    with pytest.warns(UserWarning, match="exactly zero gradient.*Pass None"):
        for _ in range(2):
            losses = _named_losses(net, x, y, names=("a", "b"))
            opt.zero_grad()
            opt.step({"a": losses["a"], "b": 0.0 * losses["b"]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        losses = _named_losses(net, x, y, names=("a", "b"))
        opt.step({"a": losses["a"], "b": 0.0 * losses["b"]})


def test_a_step_with_no_task_present_is_an_error(net):
    opt = _wrap(net, "mgda")
    with pytest.raises(ValueError, match="no task has a loss"):
        opt.step({"a": None, "b": None})


# FAMO ---------------------------------------------------------------------------------------------
def test_famo_without_a_closure_or_update_warns_with_the_fix(net):
    x, y = make_batch()
    opt = _wrap(net, "famo")
    with pytest.warns(UserWarning, match="opt.update"):
        for _ in range(2):
            opt.zero_grad()
            opt.step(_named_losses(net, x, y, names=("a", "b")))


def test_famo_update_rejects_non_finite_and_wrong_counts(net):
    x, y = make_batch()
    opt = _wrap(net, "famo")
    opt.zero_grad()
    opt.step(_named_losses(net, x, y, names=("a", "b")))
    before = opt.strategy.state_dict()
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.update([torch.tensor(float("nan")), torch.tensor(1.0)])
    with pytest.raises(ValueError, match="3 losses"):
        opt.update([torch.tensor(1.0)] * 3)
    assert repr(opt.strategy.state_dict()) == repr(before)
    opt.update({"a": torch.tensor(0.5), "b": torch.tensor(0.5)})
    assert repr(opt.strategy.state_dict()) != repr(before)


# Complex parameters ------------------------------------------------------------------------------
class _ComplexTrunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(3))

    def forward(self, x):
        h = x.to(torch.complex64) @ self.weight
        features = torch.cat([h.real, h.imag], dim=-1)
        return [head(features).squeeze(-1) for head in self.heads]


@pytest.mark.parametrize("name", GRADIENT)
def test_complex_shared_parameters_are_combined_as_pairs_of_reals(name):
    """A complex parameter is two real ones (real and imaginary parts): its update is the
    strategy's combination of the real views of the task gradients."""
    torch.manual_seed(0)
    model = _ComplexTrunk()
    x, y = torch.randn(16, 4), torch.randn(16, 3)
    reference = copy.deepcopy(model)
    losses = [((p - y[:, i]) ** 2).mean() for i, p in enumerate(reference(x))]
    rows = torch.stack(
        [torch.view_as_real(torch.autograd.grad(loss, reference.weight, retain_graph=True)[0])
         .reshape(-1) for loss in losses]
    )
    expected = make(name).aggregate(rows, torch.stack(losses).detach().double())
    opt = _wrap(model, name)
    opt.zero_grad()
    opt.backward([((p - y[:, i]) ** 2).mean() for i, p in enumerate(model(x))])
    torch.testing.assert_close(torch.view_as_real(model.weight.grad).reshape(-1), expected)


# A changing parameter set ------------------------------------------------------------------------
@pytest.mark.parametrize("name", GRADIENT)
def test_freezing_unfreezing_and_adding_parameters_mid_training(name):
    """Layers frozen, unfrozen and added between steps: every strategy trains on, and each shared
    parameter receives the combination of the tasks that reach it."""
    torch.manual_seed(0)
    model = SharedTrunkNet()
    opt = _wrap(model, name)
    extra = nn.Linear(8, 8)

    def losses(use_extra=False):
        x, y = make_batch()
        features = model.trunk(x)
        if use_extra:
            features = extra(features)
        return {n: ((h(features).squeeze(-1) - y[:, i]) ** 2).mean()
                for i, (n, h) in enumerate(zip("ab", model.heads, strict=True))}

    def step(**kw):
        opt.zero_grad()
        opt.step(lambda: losses(**kw))

    step()
    model.trunk[0].requires_grad_(False)
    step()
    assert model.trunk[0].weight.grad is None
    model.trunk[0].requires_grad_(True)
    step()
    assert model.trunk[0].weight.grad is not None
    opt.add_param_group({"params": list(extra.parameters())})
    step(use_extra=True)
    assert extra.weight.grad is not None
    for p in [*model.parameters(), *extra.parameters()]:
        assert torch.isfinite(p).all()


def test_db_mtl_ema_columns_follow_their_parameters():
    torch.manual_seed(0)
    model = SharedTrunkNet()
    opt = _wrap(model, "db_mtl")
    x, y = make_batch()
    opt.zero_grad()
    opt.step(_named_losses(model, x, y, names=("a", "b")))
    first = sum(p.numel() for p in model.trunk[0].parameters())
    kept = opt.strategy.ema[:, first:].clone()
    model.trunk[0].requires_grad_(False)
    with opt.strategy.restricted_to(None):
        strategy = copy.deepcopy(opt.strategy)
    strategy.remap_columns(torch.arange(first, opt.strategy.ema.shape[1]))
    torch.testing.assert_close(strategy.ema, kept)
    opt.zero_grad()
    opt.step(_named_losses(model, x, y, names=("a", "b")))
    assert opt.strategy.ema.shape[1] == kept.shape[1]
