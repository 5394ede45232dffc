"""DTME-MTL: expansion invariants, Proposition 2, parameter counts, schedule, persistence."""

from __future__ import annotations

import copy

import pytest
import torch
from token_models import MODELS, TinyViT, TorchEncoderModel, batch, losses

import mtlopt
from mtlopt.tokens import ExpansionPlan, expand, find_blocks


def _expanded(model, tm, te, tasks=2, tokens=6):
    return expand(find_blocks(model), ExpansionPlan(tasks, tm, te, tokens), dim=16)


@pytest.mark.parametrize("name", list(MODELS))
def test_identity_modulation_leaves_every_stream_unchanged(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x, _ = batch()
    before = [o.detach() for o in model(x)]
    _expanded(model, tm=[1, 3], te=[])
    after = [o.detach() for o in model(x)]
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(MODELS))
def test_task_tokens_reach_only_their_own_task(name):
    """Proposition 2: the gradient w.r.t. [T_in, T_i] is block diagonal, so T_i affects only L_i."""
    torch.manual_seed(0)
    model = MODELS[name](tasks=3)
    expansion = _expanded(model, tm=[2], te=[1, 2], tasks=3)
    x, y = batch(tasks=3)
    task_losses = losses(model, x, y)
    for layer in ("1.tokens", "2.tokens"):
        tokens = list(expansion.modules[layer].tokens)
        for i, loss in enumerate(task_losses):
            grads = torch.autograd.grad(loss, tokens, retain_graph=True, allow_unused=True)
            for j, g in enumerate(grads):
                if i == j:
                    assert g is not None and g.abs().sum() > 0
                else:
                    assert g is None or torch.count_nonzero(g) == 0


def test_parameter_counts_are_exact():
    model = TinyViT(tasks=3)
    expansion = _expanded(model, tm=[1, 2], te=[2, 3], tasks=3, tokens=6)
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in expansion.modules.items()}
    assert counts == {
        "1.modulation": 3 * 2 * 16,
        "2.modulation": 3 * 2 * 16,
        "2.tokens": 3 * 6 * 16,
        "3.tokens": 3 * 6 * 16,
    }


def test_blocks_before_the_branch_run_once():
    model = TinyViT()
    calls = []
    model.blocks[0].register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    model.blocks[2].register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    _expanded(model, tm=[2], te=[])
    x, _ = batch(n=8)
    model(x)
    assert calls == [8, 8]  # block 2 sees B before its own pre-hook branches the streams
    outputs = model(x)
    assert all(o.shape == (8, 1) for o in outputs)


def test_key_padding_masks_follow_the_streams():
    torch.manual_seed(0)
    model = TorchEncoderModel().eval()
    x, _ = batch()
    padding = torch.zeros(8, 5, dtype=torch.bool)
    padding[:, -1] = True
    before = [o.detach() for o in model(x, padding)]
    _expanded(model, tm=[0, 2], te=[])
    after = [o.detach() for o in model(x, padding)]
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    _expanded(TorchEncoderModel(), tm=[], te=[1])  # task tokens with a padding mask run
    model2 = TorchEncoderModel()
    _expanded(model2, tm=[], te=[1])
    assert all(o.shape == (8, 1) for o in model2(x, padding))


def _train(model, opt, steps, seed=0, tasks=2):
    for s in range(steps):
        x, y = batch(tasks=tasks, seed=seed + s)
        opt.zero_grad()
        opt.step(losses(model, x, y))


def _dtme_opt(model, base="ew", tasks=2, **kwargs):
    dtme = mtlopt.create(
        "dtme",
        blocks=model,
        num_tasks=tasks,
        base=base,
        model=model,
        analysis_steps=6,
        covariance_steps=2,
        **kwargs,
    )
    return mtlopt.MTLOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), dtme)


@pytest.mark.parametrize("name", list(MODELS))
def test_schedule_analysis_then_one_expansion(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    opt = _dtme_opt(model)
    groups = len(opt.param_groups)
    _train(model, opt, 5)
    assert opt.strategy.phase == "conflicts" and opt.strategy.report is None
    _train(model, opt, 1, seed=5)
    dtme = opt.strategy
    assert dtme.phase == "expanded"
    report = dtme.report
    assert len(report.modulation_layers) == 2 and len(report.expansion_layers) == 2
    ranked = sorted(range(4), key=lambda d: -report.range_rates[d])[:2]
    assert sorted(ranked) == report.modulation_layers or (
        sorted(report.range_rates)[-2] == sorted(report.range_rates)[-3]
    )
    # per task: W and b (2·p) per modulation layer; 6 tokens (6·p) and one gate per token layer
    expected = 2 * 2 * 16 * len(report.modulation_layers) + 2 * (6 * 16 + 1) * len(
        report.expansion_layers
    )
    assert report.parameters_added == expected
    assert report.parameters_before == sum(p.numel() for p in model.parameters()) - expected
    assert len(opt.param_groups) == groups + 2  # modulation and gates (no decay), then tokens
    assert all(g["lr"] == opt.param_groups[0]["lr"] for g in opt.param_groups[-2:])
    new = opt.param_groups[-2]["params"] + opt.param_groups[-1]["params"]
    before = [p.detach().clone() for p in new]
    _train(model, opt, 2, seed=20)
    assert any(not torch.equal(p.detach(), b) for p, b in zip(new, before, strict=True))


def test_dtme_with_pcgrad_trains_and_keeps_task_parameters_separate():
    torch.manual_seed(0)
    model = TinyViT()
    opt = _dtme_opt(model, base="pcgrad", base_kwargs={"seed": 0})
    x, y = batch(n=32, seed=99)
    with torch.no_grad():
        start = sum(float(v) for v in losses(model, x, y))
    for s in range(60):
        opt.zero_grad()
        opt.step(losses(model, x, y))
        if s == 6:
            partition = opt._partition
    with torch.no_grad():
        end = sum(float(v) for v in losses(model, x, y))
    assert opt.strategy.phase == "expanded" and end < 0.5 * start
    shared = {id(p) for p in partition.shared}
    for module in opt.strategy._expansion.modules.values():
        assert not any(id(p) in shared for p in module.parameters())
    owned = opt.strategy.task_parameters()
    for task, params in enumerate(owned):
        mine = {id(p) for p in partition.specific[task]}
        assert all(id(p) in mine for p in params)
        others = {id(p) for t, ps in enumerate(owned) if t != task for p in ps}
        assert not mine & others


def test_save_and_restore_reproduces_outputs_and_training_bit_for_bit():
    torch.manual_seed(0)
    model = TinyViT()
    opt = _dtme_opt(model, base="pcgrad", base_kwargs={"seed": 1})
    _train(model, opt, 9)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())

    torch.manual_seed(123)
    fresh = TinyViT()
    fresh_opt = _dtme_opt(fresh, base="pcgrad", base_kwargs={"seed": 7})
    fresh_opt.load_state_dict(saved_opt)
    fresh.load_state_dict(saved_model)
    x, _ = batch(seed=50)
    for a, b in zip(model(x), fresh(x), strict=True):
        assert torch.equal(a, b)
    _train(model, opt, 4, seed=30)
    _train(fresh, fresh_opt, 4, seed=30)
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)


def test_restore_in_the_middle_of_the_analysis():
    torch.manual_seed(0)
    model = TinyViT()
    opt = _dtme_opt(model)
    _train(model, opt, 4)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, 3, seed=4)
    fresh = TinyViT()
    fresh.load_state_dict(saved_model)
    fresh_opt = _dtme_opt(fresh)
    fresh_opt.load_state_dict(saved_opt)
    _train(fresh, fresh_opt, 3, seed=4)
    assert fresh_opt.strategy.report.range_rates == opt.strategy.report.range_rates
    assert fresh_opt.strategy.report.modulation_layers == opt.strategy.report.modulation_layers


def test_wrong_number_of_losses():
    model = TinyViT(tasks=3)
    opt = _dtme_opt(model, tasks=2)
    x, y = batch(tasks=3)
    with pytest.raises(ValueError, match="2 tasks but got 3"):
        opt.step(losses(model, x, y))


def test_heads_that_ignore_task_view_get_a_clear_error():
    class NoView(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vit = TinyViT()

        def forward(self, x):
            h = self.vit.embed(x) + self.vit.pos
            for block in self.vit.blocks:
                h = block(h)
            return [head(h.mean(1)) for head in self.vit.head.heads]  # no task_view

    torch.manual_seed(0)
    model = NoView()
    dtme = mtlopt.create(
        "dtme",
        blocks=model.vit.blocks,
        num_tasks=2,
        model=model,
        analysis_steps=3,
        covariance_steps=1,
    )
    opt = mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=1e-2), dtme)
    for s in range(3):
        x, y = batch(seed=s)
        opt.zero_grad()
        opt.step([((o.squeeze(-1) - y[:, i]) ** 2).mean() for i, o in enumerate(model(x))])
    with pytest.raises(RuntimeError, match=r"task_view\(x, i\)"):
        model(batch()[0])


def test_analysis_with_zero_usable_batches():
    model = TinyViT()
    opt = _dtme_opt(model)
    with pytest.raises(RuntimeError, match="zero usable batches"):
        for _ in range(6):
            opt.step()  # no losses ever reach the strategy


def test_bad_configuration():
    model = TinyViT()
    with pytest.raises(ValueError, match="covariance_steps"):
        mtlopt.create("dtme", blocks=model, num_tasks=2, analysis_steps=5, covariance_steps=5)
    with pytest.raises(ValueError, match="blocks= or model="):
        mtlopt.create("dtme")
    lazy = mtlopt.create("dtme", blocks=model, base="uw")  # UW's parameters: at the first step
    assert lazy.base.parameters() == []
    with pytest.raises(ValueError, match="rho"):
        mtlopt.create("dtme", blocks=model, num_tasks=2, rho=0.0)


def test_task_view_before_any_branch_is_the_identity():
    x = torch.randn(4, 3, 2)
    assert mtlopt.task_view(x, 1) is x


def test_streams_of_an_expanded_model_do_not_leak_into_another_model():
    torch.manual_seed(0)
    model, other = TinyViT(), TinyViT()
    other.load_state_dict({k: v for k, v in model.state_dict().items()})
    opt = _dtme_opt(model)
    _train(model, opt, 6)
    assert opt.strategy.phase == "expanded"
    x2, _ = batch(n=2)
    model(x2)  # K·B = 4 for this pass
    x4, _ = batch(n=4)
    outputs = other(x4)  # batch 4 = K·B of the previous pass, but a different model
    assert all(o.shape == (4, 1) for o in outputs)


def test_a_chainable_scheduler_built_before_the_expansion_schedules_the_new_group():
    torch.manual_seed(0)
    model = TinyViT()
    dtme = mtlopt.create(
        "dtme", blocks=model, num_tasks=2, model=model, analysis_steps=4, covariance_steps=1
    )
    opt = mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), dtme)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for s in range(7):
        x, y = batch(seed=s)
        opt.zero_grad()
        opt.step(losses(model, x, y))
        scheduler.step()
    assert len(opt.param_groups) == 3
    for group in opt.param_groups[1:]:
        assert group["lr"] == pytest.approx(opt.param_groups[0]["lr"]) == 0.01 * 0.5**7
