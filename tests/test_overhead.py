"""The small-model fast paths give the same results as the plain computations they replace: the
blocked Gramian, the column sums of |J|, the finiteness check read from G's diagonal, J's memory
reused across steps, the Gramian computed once per step."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import mtlopt
import mtlopt.engine
import mtlopt.paths.jacobian
from mtlopt.finite import check_tasks
from mtlopt.strategies.base import gramian_of, known_gramian
from mtlopt.wide import BLOCK, column_abs_sum, gram


@pytest.mark.parametrize("tasks", [2, 3, 11, 16])
@pytest.mark.parametrize("width", [5 * BLOCK, 5 * BLOCK + 37, 100])
def test_blocked_gramian_is_j_jt(tasks, width):
    jacobian = torch.randn(tasks, width, generator=torch.Generator().manual_seed(tasks + width))
    wide = jacobian.double()
    expected = np.einsum("ip,jp->ij", wide.numpy(), wide.numpy())  # float64 reference
    scale = float(np.max(np.diag(expected)))
    got = gram(jacobian).double().numpy()
    assert np.max(np.abs(got - expected)) <= 1e-5 * scale
    assert np.allclose(gram(wide).numpy(), expected, rtol=1e-12, atol=1e-10 * scale)
    # float64 from float32 J, each block cast on its own: the float64 Gramian of the same values
    assert np.allclose(gram(jacobian, dtype=torch.float64).numpy(), expected, rtol=1e-12,
                       atol=1e-10 * scale)
    assert np.allclose(gramian_of(jacobian, float64=True), expected, rtol=1e-12, atol=1e-10 * scale)


@pytest.mark.parametrize("dtype", [None, torch.float64])
@pytest.mark.parametrize("width", [5 * BLOCK + 37, 100])
def test_blocked_product_of_two_matrices_is_a_bt(width, dtype):
    """``gram(a, b)`` = ``a bᵀ`` (the engine's ``⟨δ_i, K δ_j⟩`` blocks), blocked or not."""
    generator = torch.Generator().manual_seed(width)
    a, b = torch.randn(11, width, generator=generator), torch.randn(7, width, generator=generator)
    expected = a.double().numpy() @ b.double().numpy().T
    got = gram(a, b, dtype=dtype)
    assert got.shape == (11, 7) and got.dtype == (dtype or torch.float32)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert np.max(np.abs(got.double().numpy() - expected)) <= tol * np.sqrt(width) * 3


@pytest.mark.parametrize("width", [7, 3 * BLOCK + 5])
def test_column_abs_sum(width):
    jacobian = torch.randn(5, width, dtype=torch.float64)
    expected = sum(row.abs() for row in jacobian)
    assert torch.allclose(column_abs_sum(jacobian), expected, rtol=1e-14, atol=0)


def test_finiteness_from_the_gramians_diagonal():
    jacobian = torch.randn(5, 300)
    jacobian[1, 7] = math.nan
    jacobian[2, 3] = math.inf
    jacobian[3] = 0.0
    jacobian[4] = 1e-30  # squares underflow in float32: not zero all the same
    gramian = gramian_of(jacobian)
    checks = check_tasks(jacobian, [[]] * 5, gramian.diagonal())
    assert [c.finite for c in checks] == [True, False, False, True, True]
    assert [c.zero for c in checks] == [False, False, False, True, False]
    assert checks == check_tasks(jacobian, [[]] * 5)


def test_known_gramian_is_used_only_for_that_unchanged_matrix():
    jacobian = torch.randn(3, 10, dtype=torch.float64)
    fake = np.full((3, 3), 7.0)
    with known_gramian(jacobian, fake):
        first = gramian_of(jacobian)
        first[0, 0] = -1.0  # a copy: the strategy may write into it
        assert np.all(gramian_of(jacobian) == 7.0)
        assert not np.all(gramian_of(jacobian.clone()) == 7.0)
        jacobian.mul_(2.0)
        assert np.allclose(gramian_of(jacobian), (jacobian @ jacobian.T).numpy())
    assert np.allclose(gramian_of(jacobian), (jacobian @ jacobian.T).numpy())


class _Net(nn.Module):
    def __init__(self, tasks: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16))
        self.heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(tasks))

    def forward(self, x):
        z = self.trunk(x)
        return [h(z).squeeze(-1) for h in self.heads]


RANDOMIZED = ("pcgrad", "graddrop")


def _train(model, method, batches, micro, monkeypatch=None):
    opt = mtlopt.MTLOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        mtlopt.create(method, num_tasks=3, **({"seed": 0} if method in RANDOMIZED else {})),
    )
    pointers = []
    for x, y in batches:
        opt.zero_grad()
        for part_x, part_y in zip(x.chunk(micro), y.chunk(micro), strict=True):
            losses = [((o - part_y[:, i]) ** 2).mean() for i, o in enumerate(model(part_x))]
            opt.backward(losses)
        opt.step()
        buffer = opt._jacobian_buffer
        pointers.append(None if buffer is None else buffer.data_ptr())
    return pointers


@pytest.mark.parametrize("method", ["mgda", "upgrad", "pcgrad", "graddrop", "db_mtl", "cagrad"])
@pytest.mark.parametrize("micro", [1, 2])
def test_reused_jacobian_memory_gives_the_same_steps(method, micro, monkeypatch):
    torch.manual_seed(0)
    model = _Net(3)
    batches = [(torch.randn(8, 8), torch.randn(8, 3)) for _ in range(4)]
    reused, fresh = copy.deepcopy(model), copy.deepcopy(model)
    pointers = _train(reused, method, batches, micro)
    if micro == 1:  # one block for every step (under accumulation, the window's sum is new)
        assert pointers[0] is not None and len(set(pointers)) == 1
    monkeypatch.setattr(mtlopt.paths.jacobian, "reusable_buffer", lambda jacobian: None)
    assert _train(fresh, method, batches, micro) == [None] * 4
    for a, b in zip(reused.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("method", "handed"), [("mgda", True), ("upgrad", True), ("graddrop", False)])
def test_a_gramian_strategys_update_becomes_grad_without_a_copy(method, handed):
    """On the Jacobian path a Gramian strategy's ``wᵀJ`` is new memory: its pieces become the
    shared parameters' ``.grad`` (one storage), where a copy used to be made; a strategy that
    forms its own direction (GradDrop) still has it copied. (A second micro-batch forms the
    first's update again from its weights: test_in_place_clipping_between_micro_batches_is_kept.)"""
    torch.manual_seed(0)
    model = _Net(3)
    opt = mtlopt.MTLOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        mtlopt.create(method, num_tasks=3, **({"seed": 0} if method in RANDOMIZED else {})),
        engine="jacobian",
    )
    x, y = torch.randn(8, 8), torch.randn(8, 3)
    opt.zero_grad()
    opt.backward([((o - y[:, i]) ** 2).mean() for i, o in enumerate(model(x))])
    storages = {p.grad.untyped_storage().data_ptr() for p in model.trunk.parameters()}
    assert (len(storages) == 1) == handed


def test_gramian_computed_once_per_step(monkeypatch):
    calls = []
    original = mtlopt.strategies.base.gram
    monkeypatch.setattr(
        mtlopt.strategies.base, "gram", lambda j, **kw: calls.append(1) or original(j, **kw)
    )
    torch.manual_seed(0)
    model = _Net(3)
    _train(model, "upgrad", [(torch.randn(8, 8), torch.randn(8, 3))], 1)
    assert len(calls) == 1  # the check, the strategy and the diagnostics share it


class _Boom(torch.autograd.Function):
    """Identity forward; its backward raises (after autograd may have written other .grad)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("boom in backward")


@pytest.mark.parametrize("method", ["ew", "dwa", "rlw"])
def test_loss_strategies_write_autograds_gradients_and_leave_nothing_on_failure(method):
    """The loss path's first micro-batch lets autograd write ``.grad`` itself (no copy): the
    gradients equal plain ``backward`` of the scalarized loss, and a backward that raises or a
    non-finite gradient leaves every ``.grad`` as it was (``None``)."""
    torch.manual_seed(0)
    trunk, head_a, head_b = nn.Linear(6, 6), nn.Linear(6, 1), nn.Linear(6, 1)
    params = [*trunk.parameters(), *head_a.parameters(), *head_b.parameters()]
    x = torch.randn(8, 6)

    def losses(boom: bool = False, scale: float = 1.0) -> dict[str, torch.Tensor]:
        z = trunk(x)
        b_in = _Boom.apply(z) if boom else z
        return {"a": head_a(z).pow(2).mean() * scale, "b": head_b(b_in).pow(2).mean()}

    opt = mtlopt.MTLOptimizer(torch.optim.SGD(params, lr=0.1), mtlopt.create(method, seed=0)
                              if method == "rlw" else method)
    opt.zero_grad()
    with pytest.raises(RuntimeError, match="boom"):
        opt.backward(losses(boom=True))
    assert all(p.grad is None for p in params)
    opt.zero_grad()
    with pytest.raises(FloatingPointError):
        opt.backward(losses(scale=float("inf")))
    assert all(p.grad is None for p in params)

    opt.zero_grad()
    info = opt.backward(losses())
    got = [p.grad.clone() for p in params]
    weights = info.weights
    for p in params:
        p.grad = None
    given = losses()
    sum(w * loss for w, loss in zip(weights.tolist(), given.values(), strict=True)).backward()
    for g, p in zip(got, params, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-6, atol=1e-7)


def test_a_combination_is_trusted_finite_only_below_its_bound():
    """wᵀJ is not read for finiteness where Σ|w_i|‖g_i‖ bounds it well inside the dtype; where it
    does not, the check reads it (and there it does overflow)."""
    from mtlopt.finite import combination_bounded

    jacobian = torch.full((2, 4), 3e37)  # float32: finite, each row's norm 6e37
    gramian = gramian_of(jacobian)
    assert combination_bounded(torch.tensor([0.5, 0.5]), gramian, torch.float32)
    assert torch.isfinite(torch.tensor([0.5, 0.5]) @ jacobian).all()
    assert not combination_bounded(torch.tensor([8.0, 8.0]), gramian, torch.float32)
    assert not torch.isfinite(torch.tensor([8.0, 8.0]) @ jacobian).all()
    assert combination_bounded(torch.tensor([8.0, 8.0]), gramian, torch.float64)
