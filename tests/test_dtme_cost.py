"""A cost the user chooses (issue 15): the predicted multiplier, budgeted placement, the warning
on an expensive default plan, single-task inference, the new parameters' optimizer groups, and
loading a trained model without the training machinery."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from token_models import TinyViT, batch, losses

import mtlopt
from mtlopt.tokens import choose_layers, load_expanded, predicted_multiplier, single_task


def test_predicted_multiplier_by_hand():
    # c(b) = (b + K(D − b))/D: D = 4, K = 5, branch 0 → 5; branch 2 → (2 + 10)/4 = 3
    assert predicted_multiplier(4, 5, [0], [], 6, 100) == pytest.approx(5.0)
    assert predicted_multiplier(4, 5, [2, 3], [], 6, 100) == pytest.approx(3.0)
    # tokens: K·n/N per expanded block over D blocks: 5·6/100/4 = 0.075 each
    assert predicted_multiplier(4, 5, [2], [2, 3], 6, 100) == pytest.approx(3.15)
    assert predicted_multiplier(4, 5, [], [], 6, 100) == 1.0


def test_budget_limits_the_branch_and_ranks_inside_the_allowed_layers():
    rates_range = [0.9, 0.8, 0.1, 0.3]  # the most conflicted layers are early
    rates_null = [0.9, 0.2, 0.5, 0.4]
    free = choose_layers(rates_range, rates_null, 5, 0.5, 6, 100)
    assert free.modulation_layers == [0, 1] and free.predicted_multiplier > 5.0
    # K = 5, D = 4: c(b) ≤ 2 needs b ≥ 3
    bounded = choose_layers(rates_range, rates_null, 5, 0.5, 6, 100, budget=2.2)
    assert bounded.modulation_layers == [3] and bounded.expansion_layers == [3]
    assert bounded.predicted_multiplier <= 2.2
    # a tight budget drops the tokens first
    tight = choose_layers(rates_range, rates_null, 5, 0.5, 6, 100, budget=2.0)
    assert tight.modulation_layers == [3] and tight.expansion_layers == []
    # candidate layers, ranked inside
    chosen = choose_layers(rates_range, rates_null, 2, 0.5, 6, 100, layers=[1, 2, 3])
    assert chosen.modulation_layers == [1, 3] and chosen.expansion_layers == [2, 3]
    with pytest.raises(ValueError, match="raise the budget"):
        choose_layers(rates_range, rates_null, 5, 0.5, 6, 100, budget=1.1)


def _dtme(model, **kwargs):
    dtme = mtlopt.create(
        "dtme", model=model, num_tasks=2, analysis_steps=4, covariance_steps=1, **kwargs
    )
    return mtlopt.MTLOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), dtme)


def _train(model, opt, steps, start=0):
    for s in range(start, start + steps):
        x, y = batch(seed=s)
        opt.zero_grad()
        opt.step(losses(model, x, y))


def test_the_plan_reports_its_prediction_and_an_expensive_default_is_warned():
    torch.manual_seed(0)
    model = TinyViT()
    opt = _dtme(model, rho=1.0)  # every layer: branch at 0, 2 + 4 · 2·6/5/4 = 4.4×
    with pytest.warns(UserWarning, match="budget="):
        _train(model, opt, 4)
    report = opt.strategy.report
    assert report.predicted_multiplier == opt.strategy.plan.predicted_multiplier > 3.0
    assert "predicted block compute" in report.to_markdown()
    torch.manual_seed(0)
    model = TinyViT()
    opt = _dtme(model, budget=1.6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(model, opt, 4)
    assert opt.strategy.plan.predicted_multiplier <= 1.6
    assert opt.strategy.plan.branch_layer >= 2


def test_single_task_inference_runs_one_stream_and_matches():
    torch.manual_seed(0)
    model = TinyViT()
    opt = _dtme(model, budget=3.0)
    _train(model, opt, 6)
    rows = []
    model.blocks[3].register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    model.eval()
    x, _ = batch(n=8, seed=40)
    with torch.no_grad():
        every = model(x)
        for i in range(2):
            with opt.strategy.single_task(i):
                alone = model(x)
            torch.testing.assert_close(alone[i], every[i], rtol=1e-5, atol=1e-6)
            assert torch.isnan(alone[1 - i]).all()  # another task's view is NaN, never a stand-in
    assert rows == [16, 8, 8]  # K·B for all tasks, B for one
    with pytest.raises(IndexError):
        opt.strategy.single_task(2)
    with single_task(5), pytest.raises(IndexError, match="2 task streams"):
        model(x)


def test_new_parameters_get_their_own_groups():
    """Was: group 0's hyperparameters, so AdamW decayed the modulation towards 0."""
    torch.manual_seed(0)
    model = TinyViT()
    inner = torch.optim.AdamW(
        [
            {"params": model.blocks.parameters(), "lr": 5e-4, "weight_decay": 0.1},
            {"params": [p for n, p in model.named_parameters() if not n.startswith("blocks")]},
        ],
        lr=1e-3,
        weight_decay=0.01,
    )
    dtme = mtlopt.create("dtme", model=model, num_tasks=2, analysis_steps=4, covariance_steps=1)
    opt = mtlopt.MTLOptimizer(inner, dtme)
    _train(model, opt, 4)
    modulation, tokens = opt.param_groups[-2], opt.param_groups[-1]
    assert modulation["weight_decay"] == 0.0 and modulation["lr"] == 5e-4
    assert tokens["weight_decay"] == 0.1 and tokens["lr"] == 5e-4
    mods = {id(p) for p in dtme._expansion.modulation_parameters()}
    mods |= {id(p) for p in dtme._expansion.gate_parameters()}  # a decayed gate would close
    assert {id(p) for p in modulation["params"]} == mods


def test_a_trained_model_loads_without_the_training_machinery():
    """Was: loading into a fresh model fails with torch's 'Unexpected key(s) ... dtme_...'."""
    torch.manual_seed(0)
    model = TinyViT()
    opt = _dtme(model, budget=3.0)
    _train(model, opt, 6)
    saved = copy.deepcopy(model.state_dict())
    fresh = TinyViT()
    load_expanded(fresh, saved)
    model.eval(), fresh.eval()
    x, _ = batch(seed=41)
    with torch.no_grad():
        for a, b in zip(model(x), fresh(x), strict=True):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="no DTME modules"):
        load_expanded(TinyViT(), TinyViT().state_dict())
