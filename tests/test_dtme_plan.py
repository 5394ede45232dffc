"""DTME's paper protocol: a plan from an offline analysis at iteration 0 (eval mode, fixed
batches), its stability under resampling, explicit and control plans, and the function-preserving
expansion (gated task tokens: the expanded model's outputs are bit-identical at expansion)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from token_models import MODELS, TinyViT, batch, losses
from torch import nn

import mtlopt
from mtlopt.tokens import (
    ConflictReport,
    TokenPlan,
    analyze_token_conflicts,
    plan_expansion,
)


def _batches(n: int = 6, tasks: int = 2):
    return [batch(seed=s, tasks=tasks) for s in range(n)]


def _dtme(model: nn.Module, plan, base: str = "ew") -> mtlopt.MTLOptimizer:
    return mtlopt.MTLOptimizer(
        torch.optim.Adam(model.parameters(), lr=1e-2),
        mtlopt.create("dtme", model=model, plan=plan, base=base),
    )


def test_plan_ranks_the_offline_analysis_and_leaves_the_model_unchanged():
    torch.manual_seed(0)
    model = TinyViT(tasks=3, depth=4)
    model.train()
    state = copy.deepcopy(model.state_dict())
    batches = _batches(tasks=3)
    plan = plan_expansion(model, batches, lambda b: losses(model, *b), bootstrap=20, seed=1)
    report = analyze_token_conflicts(model, batches, lambda b: losses(model, *b))
    # the same two passes as the diagnostic: the same rates
    assert plan.report.range_rates == pytest.approx(report.range_rates)
    assert plan.report.null_rates == pytest.approx(report.null_rates)
    # the paper's rule, re-derived: top round(ρ·D) = 2 layers per space, ties to the earlier layer
    def top(rates):
        return sorted(sorted(range(4), key=lambda d: (-rates[d], d))[:2])

    assert plan.modulation_layers == top(report.range_rates)
    assert plan.expansion_layers == top(report.null_rates)
    assert plan.branch_layer == min(plan.modulation_layers + plan.expansion_layers)
    b, k, d = plan.branch_layer, 3, 4
    gated_extra = k / d * len(plan.expansion_layers)  # the gate's extra block pass
    tokens_extra = k * 6 / 5 / d * len(plan.expansion_layers)
    assert plan.predicted_multiplier == pytest.approx((b + k * (d - b)) / d + tokens_extra + gated_extra)
    assert plan.sequence_length == 5 and plan.dims == [16] * 4
    assert model.training  # modes restored
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name])
    assert not any(hasattr(block, "dtme_tokens") for block in model.blocks)
    text = plan.to_markdown()
    assert "plan stability" in text and "margin" in text


def test_analysis_runs_in_eval_mode():
    seen = []

    class Probe(TinyViT):
        def forward(self, x):
            seen.append(self.training)
            return super().forward(x)

    torch.manual_seed(0)
    model = Probe()
    plan_expansion(model, _batches(2), lambda b: losses(model, *b), bootstrap=0)
    assert seen and not any(seen)
    seen.clear()
    plan_expansion(model, _batches(2), lambda b: losses(model, *b), bootstrap=0, eval_mode=False)
    assert all(seen)


def test_stability_frequencies_and_margins_match_a_brute_force_bootstrap():
    torch.manual_seed(0)
    model = TinyViT(tasks=2, depth=4)
    batches = _batches(8)
    plan = plan_expansion(model, batches, lambda b: losses(model, *b), bootstrap=30, seed=5)
    stability = plan.stability
    # brute force: redo each resample with the diagnostic on the resampled batches' conflict
    # counts. The token spaces are fitted on all batches (as documented), so the counts of a
    # batch do not depend on the resample: recompute them batch by batch with the low-level API.
    from mtlopt.tokens import TokenSpaceAnalysis

    analysis = TokenSpaceAnalysis(model.blocks, 2)
    model.eval()
    with torch.no_grad():
        for b in batches:
            losses(model, *b)
            analysis.observe_tokens()
    analysis.fit_spaces()
    per_batch = []
    for b in batches:
        per_batch.append(analysis.stage_gradients(losses(model, *b), retain_graph=False)[1])
    analysis.close()
    model.train()
    rng = np.random.default_rng(5)
    tm_hits = np.zeros(4)
    margins = []
    for _ in range(30):
        pick = rng.integers(0, 8, 8)
        conflicts = sum(per_batch[i]["range_conflicts"] for i in pick)
        pairs = sum(per_batch[i]["range_pairs"] for i in pick)
        rates = conflicts[:, 0, 1] / pairs[:, 0, 1]
        chosen = sorted(sorted(range(4), key=lambda d: (-rates[d], d))[:2])
        tm_hits[chosen] += 1
        rest = [d for d in range(4) if d not in plan.modulation_layers]
        margins.append(min(rates[plan.modulation_layers]) - max(rates[rest]))
    assert stability.modulation_frequency == pytest.approx((tm_hits / 30).tolist())
    low, high = np.percentile(margins, [2.5, 97.5])
    assert stability.modulation_margin[1:] == pytest.approx((low, high))
    assert stability.resamples == 30 and stability.batches == 8


def test_disjoint_subsets_each_give_a_plan():
    torch.manual_seed(0)
    model = TinyViT()
    plan = plan_expansion(model, _batches(6), lambda b: losses(model, *b), bootstrap=0, disjoint=3)
    assert len(plan.stability.disjoint_plans) == 3
    with pytest.raises(ValueError, match="disjoint"):
        plan_expansion(model, _batches(2), lambda b: losses(model, *b), disjoint=1)


def test_controls_keep_counts_and_branch():
    report = ConflictReport(
        range_rates=[0.1, 0.5, 0.3, 0.9, 0.2, 0.4],
        null_rates=[0.6, 0.1, 0.2, 0.3, 0.8, 0.7],
        range_ranks=[1] * 6,
        dims=[8] * 6,
        tokens_seen=[1.0] * 6,
    )
    plan = TokenPlan.explicit(3, 6, [1, 3, 5], [3, 4, 5], sequence_length=36)
    plan.report = report
    for seed in range(20):
        random = plan.random(seed)
        assert len(random.modulation_layers) == 3 and len(random.expansion_layers) == 3
        assert random.branch_layer == 1 and 1 in random.modulation_layers
        assert random.selection == "random"
    assert plan.reverse().modulation_layers == [0, 2, 4]  # lowest range rates
    assert plan.reverse().expansion_layers == [1, 2, 3]  # lowest null rates
    swapped = plan.swapped()
    assert swapped.modulation_layers == [3, 4, 5] and swapped.expansion_layers == [1, 3, 5]
    assert plan.modulation_only().expansion_layers == []
    assert plan.tokens_only().modulation_layers == []
    with pytest.raises(ValueError, match="lie in"):
        TokenPlan.explicit(2, 4, [4], [])


def _expanded_equals_plain(model: nn.Module, run, plan: TokenPlan) -> None:
    model.eval()
    with torch.no_grad():
        before = run(model)
    _dtme(model, plan)
    with torch.no_grad():
        after = run(model)
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("layers", [([], [1]), ([0, 2], [1, 2, 3]), ([1], [0, 3])])
def test_gated_expansion_is_bit_identical(name, layers):
    torch.manual_seed(0)
    model = MODELS[name]()
    x, _ = batch()
    plan = TokenPlan.explicit(2, 4, *layers, tokens_per_task=4, sequence_length=5)
    _expanded_equals_plain(model, lambda m: m(x), plan)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_gated_expansion_is_bit_identical_on_torch_encoder(norm_first, batch_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        16, 2, 32, dropout=0.0, batch_first=batch_first, norm_first=norm_first
    )

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
            self.heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(2))

        def forward(self, x):
            h = self.encoder(x if batch_first else x.transpose(0, 1))
            h = h if batch_first else h.transpose(0, 1)
            return [head(mtlopt.task_view(h, i).mean(1)) for i, head in enumerate(self.heads)]

    x = torch.randn(4, 7, 16)
    plan = TokenPlan.explicit(2, 3, [1], [1, 2], tokens_per_task=6, sequence_length=7)
    _expanded_equals_plain(Model(), lambda m: m(x), plan)


def test_gated_expansion_is_bit_identical_on_hugging_face_bert():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        attn_implementation="eager",
    )

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = transformers.BertModel(config)
            self.heads = nn.ModuleList(nn.Linear(32, 1) for _ in range(2))

        def forward(self, ids, mask):
            h = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
            return [head(mtlopt.task_view(h, i).mean(1)) for i, head in enumerate(self.heads)]

    ids = torch.randint(3, 50, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, 6:] = 0
    plan = TokenPlan.explicit(2, 4, [0, 3], [1, 2], tokens_per_task=3, sequence_length=9)
    _expanded_equals_plain(Model(), lambda m: m(ids, mask), plan)


def test_ungated_tokens_change_outputs_and_gated_ones_learn():
    torch.manual_seed(0)
    x, y = batch()
    base = TinyViT()
    ungated = copy.deepcopy(base)
    with torch.no_grad():
        before = base(x)
    _dtme(ungated, TokenPlan.explicit(2, 4, [], [1], tokens_per_task=4, gated=False))
    with torch.no_grad():
        after = ungated(x)
    assert not torch.equal(before[0], after[0])  # the paper's behaviour: tokens act at once
    gated = copy.deepcopy(base)
    opt = _dtme(gated, TokenPlan.explicit(2, 4, [], [1], tokens_per_task=4))
    gate = gated.blocks[1].dtme_gate.gate
    tokens = gated.blocks[1].dtme_tokens.tokens
    start = [t.detach().clone() for t in tokens]
    for _ in range(3):
        opt.zero_grad()
        opt.step(losses(gated, x, y))
    assert all(float(g.detach()) != 0.0 for g in gate)  # the gate opened
    assert all(not torch.equal(t, s) for t, s in zip(tokens, start, strict=True))  # tokens learn
    # Proposition 2: task 0's loss reaches neither task 1's gate nor its tokens
    opt.zero_grad()
    losses(gated, x, y)[0].backward()
    assert gate[1].grad is None or float(gate[1].grad) == 0.0
    assert tokens[1].grad is None or not tokens[1].grad.any()


def test_a_plan_expands_at_construction_and_trains_from_step_zero():
    torch.manual_seed(0)
    model = TinyViT(tasks=2)
    x, y = batch()
    plan = plan_expansion(model, _batches(4), lambda b: losses(model, *b), bootstrap=0)
    opt = _dtme(model, plan, base="pcgrad")
    dtme = opt.strategy
    assert dtme.phase == "expanded" and dtme.plan == plan.expansion
    assert dtme.report.modulation_layers == plan.modulation_layers
    added = {id(p) for g in opt.optimizer.param_groups[1:] for p in g["params"]}
    assert added == {id(p) for p in dtme._expansion.parameters()}
    for _ in range(2):
        opt.zero_grad()
        opt.step(losses(model, x, y))
    # a checkpoint restores into a fresh DTME built from the same plan, and into one without
    saved_opt, saved_model = opt.state_dict(), model.state_dict()
    for with_plan in (True, False):
        fresh = TinyViT(tasks=2)
        fresh_opt = mtlopt.MTLOptimizer(
            torch.optim.Adam(fresh.parameters(), lr=1e-2),
            mtlopt.create(
                "dtme", model=fresh, plan=plan if with_plan else None, base="pcgrad"
            ),
        )
        fresh_opt.load_state_dict(saved_opt)
        fresh.load_state_dict(saved_model)
        with torch.no_grad():
            for a, b in zip(fresh(x), model(x), strict=True):
                assert torch.equal(a, b)


def test_a_plan_for_another_model_is_refused():
    model = TinyViT(depth=4)
    with pytest.raises(ValueError, match="blocks"):
        mtlopt.create("dtme", model=model, plan=TokenPlan.explicit(2, 3, [0], []))
    with pytest.raises(ValueError, match="tasks"):
        mtlopt.create("dtme", model=model, num_tasks=3, plan=TokenPlan.explicit(2, 4, [0], []))


def test_an_optimizer_built_after_the_plan_gives_the_new_parameters_their_groups():
    """Was: 'some parameters appear in more than one parameter group' (the expanded blocks hold
    the new parameters, so model.parameters() already included them)."""
    torch.manual_seed(0)
    model = TinyViT()
    dtme = mtlopt.create("dtme", model=model, plan=TokenPlan.explicit(2, 4, [1], [2]))
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    opt = mtlopt.MTLOptimizer(inner, dtme)
    new = {id(p) for p in dtme._expansion.parameters()}
    assert not new & {id(p) for p in opt.param_groups[0]["params"]}
    modulation, tokens = opt.param_groups[-2], opt.param_groups[-1]
    assert modulation["weight_decay"] == 0.0 and tokens["weight_decay"] == 0.1
    assert {id(p) for g in opt.param_groups[1:] for p in g["params"]} == new
    x, y = batch()
    opt.zero_grad()
    opt.step(losses(model, x, y))
