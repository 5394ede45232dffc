"""The issue-18 drop-ins against values derived from their papers' equations by small independent
computations here (loops over vectors, brute force, a general-purpose solver), and, where the
authors' code differs from the paper, against that code's formulas re-derived in the test."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import SharedTrunkNet, make_batch
from scipy.optimize import minimize
from strategies_under_test import random_jacobian

import mtlopt
from mtlopt.tasks import resolve_task


def _losses(seed: int, tasks: int = 3) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).uniform(0.2, 3.0, tasks))


# Gradient strategies -----------------------------------------------------------------------------
def test_constant_is_the_fixed_weighted_sum():
    jacobian = random_jacobian(3, 5, 0)
    out = mtlopt.create("constant", weights=[0.5, 2.0, -1.0]).aggregate(jacobian)
    expected = 0.5 * jacobian[0] + 2.0 * jacobian[1] - jacobian[2]
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(mtlopt.create("constant").aggregate(jacobian), jacobian.sum(0))
    with pytest.raises(ValueError, match="2 weights given for 3 tasks"):
        mtlopt.create("constant", weights=[1.0, 2.0], num_tasks=3)


@pytest.mark.parametrize("f, selected, squared", [(0, 1, True), (1, 2, True), (0, 1, False)])
def test_krum_picks_the_rows_with_the_smallest_neighbourhood_scores(f, selected, squared):
    """Krum's score (Blanchard et al., 2017): sum of the (squared) distances to the T − f − 2
    nearest other rows, computed here on the vectors; the n_selected best rows are averaged."""
    jacobian = random_jacobian(7, 4, 3)
    rows = jacobian.numpy()
    scores = []
    for i in range(7):
        d = sorted(float(np.sum((rows[i] - rows[j]) ** 2)) for j in range(7) if j != i)
        d = d if squared else [np.sqrt(x) for x in d]
        scores.append(sum(d[: 7 - f - 2]))
    best = np.argsort(scores)[:selected]
    expected = rows[best].mean(axis=0)
    out = mtlopt.create("krum", n_byzantine=f, n_selected=selected, squared=squared).aggregate(jacobian)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10)


@pytest.mark.parametrize("trim", [0, 1, 2])
def test_trimmed_mean_drops_the_extremes_of_every_coordinate(trim):
    jacobian = random_jacobian(6, 5, 4)
    expected = [np.mean(sorted(column)[trim : 6 - trim]) for column in jacobian.numpy().T]
    out = mtlopt.create("trimmed_mean", trim_number=trim).aggregate(jacobian)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12)


def test_ntkmtl_weights_and_the_authors_scaling():
    """Paper (one sample per task): w_i = (Σ_j ‖g_j‖² / ‖g_i‖²)^½. The authors' `ntkgrad` returns
    grads @ w, `overwrite_grad` multiplies by n_tasks and `backward` clips the shared gradient to
    norm 1: re-derived here as T·Σ w_i g_i, then scaled down to norm 1 when longer."""
    jacobian = random_jacobian(3, 8, 5) * torch.tensor([[1.0], [10.0], [0.1]], dtype=torch.float64)
    norms = [float(g @ g) for g in jacobian]
    w = [np.sqrt(sum(norms) / n) for n in norms]
    expected = sum(wi * g for wi, g in zip(w, jacobian, strict=True))
    torch.testing.assert_close(mtlopt.create("ntkmtl").aggregate(jacobian), expected)
    authors = 3 * expected
    authors = authors / max(1.0, float(authors.norm()))
    got = mtlopt.create("ntkmtl", times_tasks=True, max_norm=1.0).aggregate(jacobian)
    torch.testing.assert_close(got, authors)


def _simplex_projection_by_bisection(v: np.ndarray) -> np.ndarray:
    """argmin_{x ∈ Δ} ‖x − v‖: x = max(v − θ, 0) with θ found by bisection on Σ x = 1."""
    low, high = v.min() - 1.0, v.max()
    for _ in range(200):
        theta = (low + high) / 2
        if np.maximum(v - theta, 0).sum() > 1:
            low = theta
        else:
            high = theta
    return np.maximum(v - (low + high) / 2, 0)


@pytest.mark.parametrize("variant", ["paper", "libmtl"])
def test_moco_tracks_gradients_and_steps_the_weights(variant):
    """MoCo, Algorithm 1: y_i ← y_i − β_k (y_i − h_i), λ ← Π_Δ(λ − γ_k (YYᵀ + ρI) λ), d = Yᵀλ,
    β_k = β/√k, γ_k = γ/√k. The LibMTL form (from the authors' shared code) tracks
    h_i = g_i/(‖g_i‖ + 1e-8)·L_i and maps λ with a softmax instead of the projection."""
    kwargs = {} if variant == "paper" else {"normalize": "loss", "projection": "softmax"}
    strategy = mtlopt.create("moco", rho=0.1, **kwargs)
    y, lam = np.zeros((3, 6)), np.full(3, 1 / 3)
    for k in range(1, 5):
        jacobian, losses = random_jacobian(3, 6, 10 + k), _losses(k)
        h = jacobian.numpy()
        if variant == "libmtl":
            h = h / (np.linalg.norm(h, axis=1, keepdims=True) + 1e-8) * losses.numpy()[:, None]
        y = y - 0.5 / np.sqrt(k) * (y - h)
        step = lam - 0.1 / np.sqrt(k) * (y @ y.T + 0.1 * np.eye(3)) @ lam
        if variant == "paper":
            lam = _simplex_projection_by_bisection(step)
        else:
            lam = np.exp(step) / np.exp(step).sum()
        out = strategy.aggregate(jacobian, losses)
        np.testing.assert_allclose(out.numpy(), lam @ y, rtol=1e-9, atol=1e-12)


def test_excess_mtl_follows_the_official_update():
    """He et al. (2024), Eqs. 6–9 as the official code (carried by LibMTL) runs them: S_i += g_i²,
    e_i = Σ_p g_ip² / √(S_ip + 1e-7); the first step stores e⁰ = e and keeps w = 1; afterwards
    w ← w·exp(η e/e⁰), renormalised to sum to T; the update is Σ w_i g_i."""
    strategy = mtlopt.create("excess_mtl", robust_step_size=0.5)
    sums, w, baseline = np.zeros((3, 5)), np.ones(3), None
    for k in range(4):
        jacobian = random_jacobian(3, 5, 20 + k) * (k + 1)
        g = jacobian.numpy()
        sums = sums + g**2
        e = (g**2 / np.sqrt(sums + 1e-7)).sum(axis=1)
        if baseline is None:
            baseline = e
        else:
            w = w * np.exp(0.5 * e / (baseline + 1e-7))
            w = 3 * w / w.sum()
        out = strategy.aggregate(jacobian)
        np.testing.assert_allclose(out.numpy(), w @ g, rtol=1e-9)


def test_excess_mtl_keeps_its_sums_in_the_gradients_dtype():
    """float32 gradients: S is float32 (as the official code keeps it) and the update agrees with
    the float64 run to float32 rounding."""
    single, double = (mtlopt.create("excess_mtl", robust_step_size=0.5) for _ in range(2))
    for k in range(4):
        jacobian = random_jacobian(3, 50, 30 + k) * (k + 1)
        out = single.aggregate(jacobian.float())
        torch.testing.assert_close(out, double.aggregate(jacobian).float(), rtol=2e-5, atol=1e-6)
    assert single.squared_sums.dtype == torch.float32


def test_excess_mtl_warmup_averages_the_baseline():
    strategy = mtlopt.create("excess_mtl", robust_step_size=1.0, warmup=2)
    jacobians = [random_jacobian(2, 4, 30 + k) for k in range(3)]
    sums, excess = np.zeros((2, 4)), []
    for jacobian in jacobians:
        g = jacobian.numpy()
        sums = sums + g**2
        excess.append((g**2 / np.sqrt(sums + 1e-7)).sum(axis=1))
    for jacobian in jacobians[:2]:  # warm-up: w = 1
        torch.testing.assert_close(strategy.aggregate(jacobian), jacobian.sum(0))
    w = np.exp(excess[2] / ((excess[0] + excess[1]) / 2 + 1e-7))
    w = 2 * w / w.sum()
    np.testing.assert_allclose(strategy.aggregate(jacobians[2]).numpy(), w @ jacobians[2].numpy())


def _pcd_by_slsqp(rows: np.ndarray, taus: np.ndarray) -> np.ndarray:
    """PCD's QP in parameter space, solved by scipy's SLSQP: min ½‖d − g_1‖² s.t. g_jᵀd ≥
    τ_j‖g_j‖² (rows already normalised; row 0 is the primary task)."""
    constraints = [
        {"type": "ineq", "fun": (lambda d, j=j: rows[j] @ d - taus[j - 1] * rows[j] @ rows[j]),
         "jac": (lambda d, j=j: rows[j])}
        for j in range(1, len(rows))
    ]
    result = minimize(lambda d: 0.5 * np.sum((d - rows[0]) ** 2), rows[0].copy(),
                      jac=lambda d: d - rows[0], constraints=constraints, method="SLSQP",
                      options={"ftol": 1e-15, "maxiter": 1000})
    assert result.success
    return result.x


@pytest.mark.parametrize("primary", [0, 2])
def test_pcd_solves_the_priority_constrained_problem(primary):
    """PCD (TMLR 2026): g̃_i = g_i/√(v̂_i + ε), v̂ the bias-corrected EMA (β) of ‖g_i‖², the QP
    solved in parameter space by SLSQP, the result rescaled to ‖g_primary‖; two steps so that the
    EMA matters. Agreement to the solvers' tolerance (1e-6 relative)."""
    strategy = mtlopt.create("pcd", primary=primary, tau=0.3, beta=0.9)
    ema = np.zeros(4)
    for k in range(1, 3):
        jacobian = random_jacobian(4, 9, 40 + k) * torch.tensor([[1.0], [3.0], [0.2], [1.0]])
        g = jacobian.numpy()
        ema = 0.9 * ema + 0.1 * (g**2).sum(axis=1)
        scaled = g / np.sqrt(ema / (1 - 0.9**k) + 1e-8)[:, None]
        order = [primary, *[i for i in range(4) if i != primary]]
        d = _pcd_by_slsqp(scaled[order], np.full(3, 0.3))
        expected = d * np.linalg.norm(g[primary]) / np.linalg.norm(d)
        out = strategy.aggregate(jacobian).numpy()
        np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-8 * np.abs(expected).max())


def test_pcd_special_cases():
    """g_primary = 0 gives 0; two opposite secondary tasks with τ > 0 make the constraints
    infeasible, and the update is g_primary."""
    g = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert torch.equal(mtlopt.create("pcd").aggregate(g), torch.zeros(2, dtype=torch.float64))
    opposite = torch.tensor([[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(mtlopt.create("pcd", tau=0.5).aggregate(opposite), opposite[0])


def test_primary_task_by_name_in_the_optimizer():
    """primary="b" follows task b whatever the order of the dict. With τ = 0 and two tasks PCD's
    QP is the projection of g̃_b onto the half-space g̃_aᵀd ≥ 0: g_b itself when they agree,
    else g̃_b − (g̃_aᵀg̃_b/‖g̃_a‖²) g̃_a, rescaled to ‖g_b‖. Unknown names are errors that list
    the tasks."""
    torch.manual_seed(0)
    model = SharedTrunkNet(tasks=2)
    opt = mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "pcd", primary="b",
                              tau=0.0, tasks=["a", "b"])
    trunk = list(model.trunk.parameters())
    x, y = make_batch(seed=5)
    outs = model(x)
    losses = {"b": ((outs[1] - y[:, 1]) ** 2).mean(), "a": ((outs[0] - y[:, 0]) ** 2).mean()}
    g = {k: torch.cat([t.reshape(-1) for t in torch.autograd.grad(v, trunk, retain_graph=True)])
         for k, v in losses.items()}
    opt.zero_grad()
    opt.backward(losses)
    assert opt.strategy.task_index("b") == 1
    ga, gb = (g[k].double().numpy() for k in "ab")
    sa, sb = ga / np.sqrt(ga @ ga + 1e-8), gb / np.sqrt(gb @ gb + 1e-8)  # EMA after one step
    d = sb if sa @ sb >= 0 else sb - (sa @ sb) / (sa @ sa) * sa
    expected = d * np.linalg.norm(gb) / np.linalg.norm(d)
    got = torch.cat([t.grad.reshape(-1) for t in trunk]).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(KeyError, match=r"'seg'.*'a', 'b'"):
        resolve_task("seg", ("a", "b"), 2)
    with pytest.raises(ValueError, match="tasks="):
        resolve_task("seg", None, 2)
    with pytest.raises(IndexError):
        resolve_task(2, None, 2)


def test_cr_mogm_averages_the_base_weights():
    """CR-MOGM: λ_k = α λ_{k−1} + (1 − α) λ̂_k with λ_0 = λ̂_1; with two tasks MGDA's weight has
    the closed form λ̂ = clip((g₂ − g₁)·g₂ / ‖g₁ − g₂‖², 0, 1) on g₁."""
    strategy = mtlopt.create("cr_mogm", base="mgda", alpha=0.8)
    lam = None
    for k in range(4):
        jacobian = random_jacobian(2, 5, 50 + k)
        g1, g2 = jacobian.numpy()
        a = np.clip((g2 - g1) @ g2 / np.sum((g1 - g2) ** 2), 0, 1)
        fresh = np.array([a, 1 - a])
        lam = fresh if lam is None else 0.8 * lam + 0.2 * fresh
        np.testing.assert_allclose(strategy.aggregate(jacobian).numpy(), lam @ jacobian.numpy(),
                                   rtol=1e-8)
    with pytest.raises(TypeError, match="reports none"):
        mtlopt.create("cr_mogm", base="trimmed_mean").aggregate(random_jacobian(3, 4, 0))
    with pytest.raises(TypeError, match="not a gradient strategy"):
        mtlopt.create("cr_mogm", base="uw")


def test_cr_mogm_tells_its_base_which_columns_are_which():
    """A base that reads the column layout (as per-group aggregation does) is told it through
    the wrapper, on both engines."""
    from mtlopt.strategies.mgda import MGDA

    class Observing(MGDA):
        def __init__(self):
            super().__init__()
            self.seen: list[int] = []

        def observe_columns(self, shared, param_groups):
            self.seen.append(sum(p.numel() for p in shared))

    for engine in ("jacobian", "gramian"):
        model, base = SharedTrunkNet(), Observing()
        opt = mtlopt.MTLOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), mtlopt.create("cr_mogm", base=base),
            engine=engine,
        )
        x, y = make_batch()
        info = opt.step([((p - y[:, i]) ** 2).mean() for i, p in enumerate(model(x))])
        assert info.engine == engine
        assert base.seen[-1] == sum(p.numel() for p in model.trunk.parameters())


# Per-group aggregation ---------------------------------------------------------------------------
def _pcgrad_two(g: np.ndarray) -> np.ndarray:
    """PCGrad with two tasks (deterministic: each visits the other once)."""
    out = []
    for i, j in ((0, 1), (1, 0)):
        gi = g[i].copy()
        if gi @ g[j] < 0:
            gi = gi - (gi @ g[j]) / (g[j] @ g[j]) * g[j]
        out.append(gi)
    return out[0] + out[1]


@pytest.mark.parametrize("group_by", ["tensor", "module", "param_group"])
def test_group_by_applies_the_strategy_to_each_block(group_by):
    """The trunk's gradient per group is PCGrad of that group's task gradients alone."""
    torch.manual_seed(0)
    model = SharedTrunkNet(tasks=2)
    trunk = list(model.trunk.parameters())
    groups = [{"params": trunk[:2]}, {"params": trunk[2:] + list(model.heads.parameters())}]
    opt = mtlopt.MTLOptimizer(torch.optim.SGD(groups, lr=0.1), "pcgrad", group_by=group_by,
                              modules=None if group_by == "param_group" else model)
    x, y = make_batch(seed=3)
    losses = [((p - y[:, i]) ** 2).mean() for i, p in enumerate(model(x))]
    grads = [torch.autograd.grad(loss, trunk, retain_graph=True) for loss in losses]
    opt.zero_grad()
    opt.backward(losses)
    blocks = {"tensor": [[0], [1], [2], [3]], "module": [[0, 1], [2, 3]],
              "param_group": [[0, 1], [2, 3]]}[group_by]
    for block in blocks:
        g = np.stack([np.concatenate([grads[t][k].reshape(-1).numpy() for k in block])
                      for t in range(2)])
        expected = _pcgrad_two(g)
        got = np.concatenate([trunk[k].grad.reshape(-1).numpy() for k in block])
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_gradvac_granularities_keep_targets_per_group_and_resume():
    """GradVac's all_matrix mode is one GradVac per tensor (own targets); its state round-trips."""
    torch.manual_seed(0)
    model = SharedTrunkNet(tasks=3)
    opt = mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), "gradvac",
                              granularity="all_matrix", seed=0, modules=model)
    for step in range(3):
        x, y = make_batch(tasks=3, seed=step)
        opt.zero_grad()
        opt.step([((p - y[:, i]) ** 2).mean() for i, p in enumerate(model(x))])
    state = opt.strategy.state_dict()
    assert set(state["blocks"]) == {"trunk.0.weight", "trunk.0.bias", "trunk.2.weight",
                                    "trunk.2.bias"}
    targets = [np.asarray(b["targets"]["__ndarray__"]) for b in state["blocks"].values()]
    assert not all(np.allclose(targets[0], t) for t in targets[1:])  # targets differ per tensor
    fresh = mtlopt.create("gradvac", granularity="all_matrix", seed=0, modules=model)
    fresh.load_state_dict(state)
    assert repr(fresh.state_dict()) == repr(state)
    with pytest.raises(ValueError, match="modules=model"):
        mtlopt.create("gradvac", granularity="all_layer")
    with pytest.raises(TypeError, match="gradient strategies"):
        mtlopt.create("uw", group_by="tensor")


# Loss strategies ---------------------------------------------------------------------------------
def _finite_difference(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    return np.array([(f(x + h * e) - f(x - h * e)) / (2 * h) for e in np.eye(len(x))])


def test_cosmos_objective_and_weights():
    """COSMOS: Σ r_i L_i − λ rᵀL/(‖r‖‖L‖); weights are its partial derivatives."""
    r, lam = np.array([0.2, 0.5, 0.3]), 2.0
    f = lambda L: r @ L - lam * (r @ L) / (np.linalg.norm(r) * np.linalg.norm(L))  # noqa: E731
    losses = _losses(1)
    out = mtlopt.create("cosmos", preference=list(r), lambda_=lam).scalarize(losses)
    assert float(out.loss) == pytest.approx(f(losses.numpy()), rel=1e-12)
    np.testing.assert_allclose(out.weights.numpy(), _finite_difference(f, losses.numpy()), rtol=1e-6)


def test_pbi_objective_and_weights():
    """PBI: d1 = (L − z)ᵀŵ, d2 = ‖L − z − d1 ŵ‖, d1 + θ d2 (MOEA/D)."""
    w, z, theta = np.array([1.0, 2.0, 0.5]), np.array([0.1, 0.0, 0.05]), 5.0
    unit = w / np.linalg.norm(w)

    def f(L):
        d1 = (L - z) @ unit
        return d1 + theta * np.linalg.norm(L - z - d1 * unit)

    losses = _losses(2)
    out = mtlopt.create("pbi", preference=list(w), reference=list(z), theta=theta).scalarize(losses)
    assert float(out.loss) == pytest.approx(f(losses.numpy()), rel=1e-12)
    np.testing.assert_allclose(out.weights.numpy(), _finite_difference(f, losses.numpy()), rtol=1e-6)


def test_igb_weights_after_the_base_window():
    """IGBv1: w = 1 until the base losses (mean of the first base_steps losses) are known, then
    w = T·softmax(L/L_base); the objective is Σ w log L (the authors' `get_weighted_loss`)."""
    strategy = mtlopt.create("igb", base_steps=2, eps=0.0)
    history = [_losses(s) for s in range(3)]
    for losses in history[:2]:
        out = strategy.scalarize(losses)
        assert float(out.loss) == pytest.approx(float(np.log(losses.numpy()).sum()))
        out.commit()
    base = (history[0].numpy() + history[1].numpy()) / 2
    ratio = history[2].numpy() / base
    w = 3 * np.exp(ratio) / np.exp(ratio).sum()
    out = strategy.scalarize(history[2])
    assert float(out.loss) == pytest.approx(float(w @ np.log(history[2].numpy())), rel=1e-12)
    np.testing.assert_allclose(out.weights.numpy(), w / history[2].numpy(), rtol=1e-12)


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_go4align_groups_by_exact_kmeans(groups):
    """GO4Align: p ← normalise(p ⊙ exp(−η L)), r_i = (Σ_j L_j / L_i) p_i, then k-means of the T
    scalars; here the optimal k-means is found by brute force over every assignment of the 5
    tasks to `groups` clusters."""
    strategy = mtlopt.create("go4align", num_groups=groups, robust_step_size=0.3)
    p = np.full(5, 0.2)
    for step in range(2):
        losses = torch.from_numpy(np.random.default_rng(step).uniform(0.2, 5.0, 5))
        L = losses.numpy()
        p = p * np.exp(-0.3 * L)
        p = p / p.sum()
        r = L.sum() / L * p
        best, centres = np.inf, None
        for labels in itertools.product(range(groups), repeat=5):
            if len(set(labels)) != groups:
                continue
            labels = np.array(labels)
            c = np.array([r[labels == k].mean() for k in range(groups)])
            cost = np.sum((r - c[labels]) ** 2)
            if cost < best - 1e-12:
                best, centres = cost, c[labels]
        out = strategy.scalarize(losses)
        out.commit()
        np.testing.assert_allclose(out.weights.numpy(), centres, rtol=1e-10)
        assert float(out.loss) == pytest.approx(float(centres @ L), rel=1e-10)


def test_go4align_weights_are_unbounded_unless_max_weight_clips_them():
    """One step from p = 1/2 with L = (1, 1e-9): p ∝ exp(−ηL) ≈ (1/2, 1/2), r_i = (ΣL/L_i) p_i, two
    groups of one task each: the weights are r ≈ (0.5, 5e8), the paper's unbounded scales;
    max_weight clips each weight and changes nothing below the bound."""
    losses = torch.tensor([1.0, 1e-9], dtype=torch.float64)
    eta = 1e-4
    p = np.exp(-eta * losses.numpy()) / np.exp(-eta * losses.numpy()).sum()
    r = losses.numpy().sum() / losses.numpy() * p
    free = mtlopt.create("go4align").scalarize(losses)
    np.testing.assert_allclose(free.weights.numpy(), r, rtol=1e-12)
    assert float(free.weights[1]) > 4e8
    clipped = mtlopt.create("go4align", max_weight=10.0).scalarize(losses)
    np.testing.assert_allclose(clipped.weights.numpy(), np.minimum(r, 10.0), rtol=1e-12)
    assert float(clipped.loss) == pytest.approx(float(np.minimum(r, 10.0) @ losses.numpy()))
    with pytest.raises(ValueError, match="max_weight must be positive"):
        mtlopt.create("go4align", max_weight=0.0)


def test_pbi_gives_the_smaller_loss_a_negative_weight_when_theta_exceeds_one():
    """Two tasks, ŵ = (1, 1)/√2, z* = 0, L₁ > L₂: the perpendicular unit vector is (1, −1)/√2, so
    the effective weights are ((1 + θ)/√2, (1 − θ)/√2): with MOEA/D's θ = 5 the smaller loss is
    pushed up, toward the preference ray; θ ≤ 1/√(T − 1) keeps every weight non-negative."""
    losses = torch.tensor([2.0, 1.0], dtype=torch.float64)
    for theta in (5.0, 1.0, 0.5):
        weights = mtlopt.create("pbi", theta=theta).scalarize(losses).weights.numpy()
        np.testing.assert_allclose(weights, np.array([1 + theta, 1 - theta]) / np.sqrt(2), rtol=1e-12)


def test_ldc_mtl_objective_ratios_and_logit_gradient():
    """LDC-MTL (the authors' trainer): ρ = L⁽¹⁾/min L⁽¹⁾ fixed at the first step, L̃ = L/ρ,
    w = softmax(ξ), objective wᵀL̃/Σw + λ Σ_k |w_k L̃_k − w_{k+1} L̃_{k+1}|; the logits get the
    objective's gradient (checked by finite differences)."""
    strategy = mtlopt.create("ldc_mtl", lambda_=0.05, num_tasks=3)
    first = torch.tensor([2.0, 1.0, 4.0], dtype=torch.float64)
    strategy.scalarize(first).commit()
    rho = np.array([2.0, 1.0, 4.0])
    xi = np.array([0.3, -0.2, 0.1])
    with torch.no_grad():
        for p, v in zip(strategy.parameters(), xi, strict=True):
            p.fill_(v)

    def f(xi, L):
        w = np.exp(xi) / np.exp(xi).sum()
        a = w * L / rho
        return a.sum() / w.sum() + 0.05 * np.abs(a[:-1] - a[1:]).sum()

    losses = torch.tensor([1.5, 1.2, 3.0], dtype=torch.float64)
    out = strategy.scalarize(losses)
    assert float(out.loss.detach()) == pytest.approx(f(xi, losses.numpy()), rel=1e-6)
    np.testing.assert_allclose(out.weights.numpy(),
                               _finite_difference(lambda L: f(xi, L), losses.numpy()), rtol=1e-5)
    grads = torch.autograd.grad(out.loss, strategy.parameters())
    np.testing.assert_allclose([float(g) for g in grads],
                               _finite_difference(lambda v: f(v, losses.numpy()), xi), rtol=1e-4,
                               atol=1e-8)


# Absent tasks ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "attribute"),
    [("moco", "y"), ("moco", "lambd"), ("excess_mtl", "squared_sums"), ("excess_mtl", "weights"),
     ("pcd", "_squared_ema"), ("cr_mogm", "lambd"), ("go4align", "probs"), ("igb", "_sums")],
)
def test_an_absent_task_state_is_not_advanced(name, attribute):
    """Three steps with every task, three without b: b's entries stay as they were, a's move."""
    model = SharedTrunkNet(tasks=3)
    opt = mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), name)

    def named(x, y, drop_b=False):
        losses = {n: ((p - y[:, i]) ** 2).mean() * (4 if n == "b" else 1)
                  for i, (n, p) in enumerate(zip("abc", model(x), strict=True))}
        return {**losses, "b": None} if drop_b else losses

    for step in range(3):
        x, y = make_batch(tasks=3, seed=step)
        opt.zero_grad()
        opt.step(named(x, y))
    before = getattr(opt.strategy, attribute)
    before = before.clone() if isinstance(before, torch.Tensor) else np.array(before, copy=True)
    for step in range(3):
        x, y = make_batch(tasks=3, seed=10 + step)
        opt.zero_grad()
        opt.step(named(x, y, drop_b=True))
    after = getattr(opt.strategy, attribute)
    as_array = (lambda v: v.numpy()) if isinstance(after, torch.Tensor) else np.asarray
    np.testing.assert_array_equal(as_array(after)[1], as_array(before)[1])
    assert not np.array_equal(as_array(after)[0], as_array(before)[0])


def test_ldc_mtl_absent_logit_gets_no_gradient():
    model = SharedTrunkNet(tasks=3)
    opt = mtlopt.MTLOptimizer(torch.optim.Adam(model.parameters(), lr=0.05), "ldc_mtl")
    x, y = make_batch(tasks=3)
    losses = lambda: {n: ((p - y[:, i]) ** 2).mean()  # noqa: E731
                      for i, (n, p) in enumerate(zip("abc", model(x), strict=True))}
    for _ in range(2):
        opt.zero_grad()
        opt.step(losses())
    value_b = opt.strategy.parameters()[1].detach().clone()
    for _ in range(2):
        opt.zero_grad()
        opt.step({**losses(), "b": None})
        assert opt.strategy.parameters()[1].grad is None
    assert torch.equal(opt.strategy.parameters()[1].detach(), value_b)


def test_the_drop_ins_are_registered_and_reach_the_generic_suites():
    from strategies_under_test import FIELD_DROPINS_18A, gradient_strategies

    assert set(FIELD_DROPINS_18A) <= set(mtlopt.available())
    gradient = {n for n in FIELD_DROPINS_18A if mtlopt.info(n).kind.value == "gradient"}
    assert gradient == {"constant", "krum", "trimmed_mean", "ntkmtl", "moco", "excess_mtl", "pcd",
                        "cr_mogm"}
    assert gradient <= set(gradient_strategies())
