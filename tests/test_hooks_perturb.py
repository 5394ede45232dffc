"""Hook 2, perturb and re-evaluate (F-MTL, SAMO): the perturbation of each task is ρ g/‖g‖ (shared
part and head part apart), parameters and BatchNorm statistics are restored bit for bit, and the
update is the base aggregator applied as the papers say, all computed here with plain autograd."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_batch
from torch import nn

import mtlopt


class BatchNormNet(nn.Module):
    def __init__(self, tasks: int = 2) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 8))
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(tasks))

    def forward(self, x):
        z = self.trunk(x)
        return [h(z).squeeze(-1) for h in self.heads]


def _losses(model, x, y):
    return [((p - y[:, i]) ** 2).mean() for i, p in enumerate(model(x))]


def _recording_closure(model, x, y):
    seen = []

    def closure():
        seen.append([p.detach().clone() for p in model.parameters()])
        return _losses(model, x, y)

    return closure, seen


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def _task_gradients(model, x, y):
    """Per task: (trunk gradient, own head gradient) at the model's parameters, BN stats kept."""
    model = copy.deepcopy(model)
    out = []
    for t, loss in enumerate(_losses(model, x, y)):
        trunk = torch.autograd.grad(loss, list(model.trunk.parameters()), retain_graph=True)
        head = torch.autograd.grad(loss, list(model.heads[t].parameters()), retain_graph=True)
        out.append((_flat(trunk), _flat(head)))
    return out


def _at(model, trunk_offset, head_offset, task):
    moved = copy.deepcopy(model)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(
            _flat(moved.trunk.parameters()) + trunk_offset, moved.trunk.parameters()
        )
        head = moved.heads[task]
        torch.nn.utils.vector_to_parameters(_flat(head.parameters()) + head_offset, head.parameters())
    return moved


@pytest.mark.parametrize("name", ["fmtl", "samo"])
def test_parameters_and_batchnorm_statistics_are_restored_bit_for_bit(name):
    torch.manual_seed(0)
    model = BatchNormNet()
    twin = copy.deepcopy(model)
    x, y = make_batch()
    opt = mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), name, rho=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    closure, seen = _recording_closure(model, x, y)
    opt.step(closure)
    assert len(seen) == (3 if name == "fmtl" else 5)  # 1 + T (+ 2 zeroth-order probes)
    assert any(not torch.equal(a, b) for a, b in zip(seen[-1], before, strict=True))
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)
    twin(x)  # the statistics of one training forward: the step's first evaluation
    for a, b in zip(model.buffers(), twin.buffers(), strict=True):
        assert torch.equal(a, b)


def _adaptive_offset(rho, theta, g):
    """Adaptive SAM (Kwon et al., 2021; F-MTL's scripts): ρ θ²⊙g / ‖|θ|⊙g‖."""
    return rho * theta**2 * g / (theta.abs() * g).norm()


@pytest.mark.parametrize("adaptive", [False, True])
def test_fmtl_perturbs_each_task_by_rho_along_its_gradient_and_aggregates_as_the_paper(adaptive):
    """ε_t = ρ g_t/‖g_t‖ on the trunk and ρ h_t/‖h_t‖ on head t (adaptive: ρ θ²⊙g/‖|θ|⊙g‖ on
    each part); d = Agg(g) + Agg(g^SAM − g); heads take their SAM gradient (Phan et al.,
    Algorithm 1)."""
    torch.manual_seed(0)
    model = BatchNormNet()
    model.eval()  # fixed statistics, so that the deep copies below evaluate the same function
    reference = copy.deepcopy(model)
    x, y = make_batch()
    rho = 0.3
    opt = mtlopt.MTLOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), "fmtl", base="upgrad", rho=rho,
        adaptive=adaptive,
    )  # fmt: skip
    closure, seen = _recording_closure(model, x, y)
    opt.step(closure)
    plain = _task_gradients(reference, x, y)
    start = _flat(reference.parameters())
    trunk_theta = _flat(reference.trunk.parameters()).detach()
    sam_trunk, sam_heads = [], []
    for t, (g, h) in enumerate(plain):
        eps_trunk, eps_head = rho * g / g.norm(), rho * h / h.norm()
        if adaptive:
            head_theta = _flat(reference.heads[t].parameters()).detach()
            eps_trunk = _adaptive_offset(rho, trunk_theta, g)
            eps_head = _adaptive_offset(rho, head_theta, h)
        moved = _at(reference, eps_trunk, eps_head, t)
        torch.testing.assert_close(_flat(seen[1 + t]), _flat(moved.parameters()))
        assert not torch.equal(_flat(seen[1 + t]), start)
        loss = _losses(moved, x, y)[t]
        sam_trunk.append(_flat(torch.autograd.grad(loss, list(moved.trunk.parameters()), retain_graph=True)))
        sam_heads.append(_flat(torch.autograd.grad(loss, list(moved.heads[t].parameters()))))
    j = torch.stack([g for g, _ in plain])
    j_sam = torch.stack(sam_trunk)
    upgrad = mtlopt.create("upgrad")
    expected = upgrad.aggregate(j) + upgrad.aggregate(j_sam - j)
    got = _flat([p.grad for p in model.trunk.parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    for t in range(2):
        head = _flat([p.grad for p in model.heads[t].parameters()])
        torch.testing.assert_close(head, sam_heads[t], rtol=1e-5, atol=1e-7)


def test_samo_with_beta_0_perturbs_along_the_mean_gradient():
    """β = 0: e_t = g = ∇ mean ℓ for every task; d = Agg(g_1^SAM, g_2^SAM) (SAMO, ICCV 2025)."""
    torch.manual_seed(0)
    model = BatchNormNet()
    model.eval()
    reference = copy.deepcopy(model)
    x, y = make_batch()
    rho = 0.2
    opt = mtlopt.MTLOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), "samo", base="mgda", rho=rho, beta=0.0
    )
    closure, seen = _recording_closure(model, x, y)
    opt.step(closure)
    plain = _task_gradients(reference, x, y)
    mean = (plain[0][0] + plain[1][0]) / 2
    rows = []
    for t, (_, h) in enumerate(plain):
        moved = _at(reference, rho * mean / mean.norm(), rho * h / h.norm(), t)
        torch.testing.assert_close(_flat(seen[3 + t]), _flat(moved.parameters()))
        loss = _losses(moved, x, y)[t]
        rows.append(_flat(torch.autograd.grad(loss, list(moved.trunk.parameters()))))
    expected = mtlopt.create("mgda").aggregate(torch.stack(rows))
    got = _flat([p.grad for p in model.trunk.parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_samo_local_direction_is_the_two_point_zeroth_order_estimate():
    """β = 1: e_t = (ℓ_t(θ+εz) − ℓ_t(θ−εz))/(2ε) · z, read back from the probes' parameters."""
    torch.manual_seed(0)
    model = BatchNormNet()
    model.eval()
    reference = copy.deepcopy(model)
    x, y = make_batch()
    rho, eps = 0.2, 1e-2
    opt = mtlopt.MTLOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), "samo", base="mgda", rho=rho, beta=1.0,
        eps=eps, seed=3,
    )  # fmt: skip
    closure, seen = _recording_closure(model, x, y)
    opt.step(closure)
    trunk = len(list(model.trunk.parameters()))
    start = _flat(list(reference.trunk.parameters()))
    ahead, behind = _flat(seen[1][:trunk]), _flat(seen[2][:trunk])
    z = (ahead - start) / eps
    torch.testing.assert_close(behind, start - eps * z, rtol=0, atol=1e-6)
    plus = _losses(_at(reference, eps * z, 0.0, 0), x, y)
    minus = _losses(_at(reference, -eps * z, 0.0, 0), x, y)
    for t in range(2):
        e = float((plus[t] - minus[t]).detach() / (2 * eps)) * z
        torch.testing.assert_close(
            _flat(seen[3 + t][:trunk]), start + rho * e / e.norm(), rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize("name", ["fmtl", "samo"])
def test_a_step_without_a_closure_is_refused_and_changes_nothing(name):
    model = BatchNormNet()
    model.eval()  # the test's own forwards leave the statistics alone
    before = copy.deepcopy(model.state_dict())
    opt = mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), name)
    x, y = make_batch()
    with pytest.raises(TypeError, match=r"pass opt.step\(closure\)"):
        opt.step(_losses(model, x, y))
    with pytest.raises(TypeError, match="same batch at every call"):
        opt.backward(_losses(model, x, y))
    assert opt.task_names is None and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_sam_with_any_aggregator_is_one_line_and_saves_the_base_state():
    strategy = mtlopt.create("fmtl", base="pcgrad", seed=5, rho=0.1)
    assert strategy.base.info.name == "pcgrad" and strategy.rho == 0.1
    assert set(strategy.state_dict()) == {"__strategy__", "base"}
    with pytest.raises(TypeError, match="plain gradient strategy"):
        mtlopt.create("fmtl", base="uw")
    with pytest.raises(TypeError, match="hook of its own"):
        mtlopt.create("samo", base="modo")


def test_an_absent_task_is_neither_perturbed_nor_updated():
    torch.manual_seed(0)
    model = BatchNormNet(tasks=3)
    x, y = make_batch(tasks=3)
    opt = mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "fmtl", base="mgda")
    seen = []

    def closure():
        seen.append(1)
        a, _, c = _losses(model, x, y)
        return {"a": a, "b": None, "c": c}

    info = opt.step(closure)
    assert len(seen) == 3 and info.present == ["a", "c"]
    assert all(p.grad is None for p in model.heads[1].parameters())


def test_fmtl_defaults_are_the_authors_scripts():
    """FS-MTL's nyuv2/train.py and city2scape/train.py: --adaptive True --rho 2; plain SAM's ρ is
    0.05."""
    default = mtlopt.create("fmtl")
    assert default.adaptive and default.rho == 2.0
    assert mtlopt.create("fmtl", adaptive=False).rho == 0.05
