"""The Gramian engine (mtlopt.autogram) against the Jacobian path: same steps, on every strategy it
serves and on models this project did not write."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mtlopt
from mtlopt.autogram import (
    engine_serves,
    find_layers,
    gramian_engine_strategies,
    record_gradients,
)
from mtlopt.partition import Partition

SERVED = gramian_engine_strategies()


class Trunk(nn.Module):
    """An MLP trunk with a LayerNorm (a parameter outside the engine's layers) and task heads."""

    def __init__(self, tasks: int = 3, width: int = 16) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(8, width), nn.GELU(), nn.Linear(width, width), nn.LayerNorm(width)
        )
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(tasks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.trunk(x)
        return [h(z).pow(2).mean() * (i + 1) for i, h in enumerate(self.heads)]


def run(build, strategy: str, engine: str, steps: int = 3, batches=None, dtype=torch.float32,
        **options):
    torch.manual_seed(0)
    model = build().to(dtype)
    opt = mtlopt.MTLOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05), strategy, engine=engine,
        tasks=["t0", "t1", "t2"][: len(model.heads) if hasattr(model, "heads") else 2],
        **options,
    )
    if strategy == "pivrg":  # performance scores from a validation signal
        opt.observe(scores=[0.5, 0.6, 0.7])
    infos = []
    for step in range(steps):
        opt.zero_grad()
        losses = batches(model, step) if batches else model(_inputs(step, dtype))
        infos.append(opt.step({f"t{i}": loss for i, loss in enumerate(losses)}))
    return [p.detach().clone() for p in model.parameters()], infos


def _inputs(step: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(12, 8, generator=torch.Generator().manual_seed(step)).to(dtype)


def assert_same(build, strategy, batches=None, steps=3, dtype=torch.float32, tol=2e-5, **options):
    reference, ref_infos = run(build, strategy, "jacobian", steps, batches, dtype, **options)
    params, infos = run(build, strategy, "gramian", steps, batches, dtype, **options)
    assert [i.engine for i in ref_infos] == ["jacobian"] * steps
    for a, b in zip(reference, params, strict=True):
        torch.testing.assert_close(b, a, atol=tol, rtol=tol)
    for a, b in zip(ref_infos, infos, strict=True):
        if a.weights is not None:
            torch.testing.assert_close(b.weights, a.weights, atol=tol, rtol=tol, equal_nan=True)
        torch.testing.assert_close(b.cosines, a.cosines, atol=tol, rtol=tol, equal_nan=True)
    return infos


def test_the_engine_serves_the_gramian_strategies_and_not_the_others():
    for name in ("mgda", "upgrad", "dualproj", "nash_mtl", "fairgrad", "imtl_g", "aligned_mtl",
                 "cagrad", "pcgrad", "gradvac", "ntkmtl", "cr_mogm"):
        assert name in SERVED, name
    assert not engine_serves(mtlopt.create("cr_mogm", base="graddrop", num_tasks=2))
    for name in ("ew", "graddrop", "db_mtl", "moco", "trimmed_mean", "uw"):
        assert name not in SERVED
        assert not engine_serves(mtlopt.create(name, num_tasks=2))


@pytest.mark.parametrize("strategy", SERVED)
def test_every_served_strategy_takes_the_same_steps_as_with_J(strategy):
    infos = assert_same(Trunk, strategy)
    assert [i.engine for i in infos] == ["gramian"] * 3


def test_the_kernel_form_reuses_its_work_arrays_from_step_to_step():
    """On the host the kernel form's T × N × out arrays (output gradients, ``K δ_i``) are last
    step's, not fresh ones (page-faulted on every step past glibc's mmap threshold), and the
    steps stay the Jacobian path's."""
    wide = lambda: Trunk(width=256)  # noqa: E731  12 rows against 256 columns: the kernel form
    torch.manual_seed(0)
    model = wide()
    opt = mtlopt.MTLOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05), "mgda", engine="gramian"
    )
    arrays = []
    for step in range(3):
        opt.zero_grad()
        info = opt.step(model(_inputs(step)))
        assert info.engine == "gramian"
        arrays.append({k: a.data_ptr() for k, a in opt._engine_pool._arrays.items()})
    assert {slot for _, slot in arrays[0]} == {"deltas", "products"}
    assert arrays[0] == arrays[1] == arrays[2]
    assert_same(wide, "mgda")


@pytest.mark.parametrize("strategy", ["upgrad", "mgda", "pcgrad"])
def test_float64_steps_agree_to_rounding(strategy):
    assert_same(Trunk, strategy, dtype=torch.float64, tol=1e-11)


@pytest.mark.parametrize("kernel", [True, False])
def test_a_layer_block_of_the_gramian_is_J_J_transpose(kernel, monkeypatch):
    """Both ways of forming a layer's block (the input kernel, the stacked weight gradients)
    against the brute-force rows of J, in float64."""
    import mtlopt.autogram as autogram

    monkeypatch.setattr(autogram, "kernel_cost", lambda *sizes: 0 if kernel else 10**18)
    torch.manual_seed(1)
    layer = nn.Linear(5, 4).double()
    x = torch.randn(3, 7, 5, dtype=torch.float64)
    targets = torch.randn(3, 3, 7, 4, dtype=torch.float64)
    rows = []
    for t in range(3):
        out = layer(x)
        loss = (out * targets[t]).sum() + out.pow(2).sum() * t
        gw, gb = torch.autograd.grad(loss, [layer.weight, layer.bias])
        rows.append(torch.cat([gw.reshape(-1), gb]))
    jacobian = torch.stack(rows)
    out = layer(x)
    losses = [(out * targets[t]).sum() + out.pow(2).sum() * t for t in range(3)]
    partition = Partition(shared=[layer.weight, layer.bias], specific=[[], [], []])
    layers = find_layers(losses, partition)
    assert [(found[0].weight, found[0].bias) for found in layers] == [(layer.weight, layer.bias)]
    recorded = record_gradients(losses, [layer.weight, layer.bias], partition, layers)
    assert (recorded.layers[0].deltas is not None) == kernel  # the form the test forces
    torch.testing.assert_close(recorded.gramian(torch.float64), jacobian @ jacobian.T,
                               rtol=1e-12, atol=1e-12)
    _, grads = recorded.combined(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))
    expected = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64) @ jacobian
    torch.testing.assert_close(torch.cat([g.reshape(-1) for g in grads]), expected)


def test_a_weight_used_outside_its_products_is_left_to_autograd():
    """A weight also used other than as ``x Wᵀ`` (a penalty on it): the engine must not take it,
    whose gradient would miss that use. A second product with the same weight (tied layers
    through F.linear) is one more product of the same layer."""

    class Tied(Trunk):
        def forward(self, x):
            z = self.trunk(x)
            z = z + nn.functional.linear(z, self.trunk[2].weight)  # a second product: taken
            penalty = self.trunk[0].weight.pow(2).sum() * 1e-2  # another use: not taken
            return [h(z).pow(2).mean() * (i + 1) + penalty for i, h in enumerate(self.heads)]

    model = Tied()
    losses = model(_inputs(0))
    trainable = list(model.trunk.parameters())
    partition = Partition(shared=trainable, specific=[[], [], []])
    layers = find_layers(losses, partition)
    assert [found[0].weight for found in layers] == [model.trunk[2].weight]
    assert len(layers[0]) == 2 and all(p.bias is None for p in layers[0])  # bias: one use of two
    infos = assert_same(Tied, "upgrad")
    assert infos[-1].engine == "gramian"


def test_outputs_modified_in_place_and_stale_forwards():
    class InPlace(Trunk):
        def forward(self, x):
            with torch.enable_grad():
                self.trunk(x * 3)  # a forward whose graph no loss uses
            y = self.trunk[0](x)
            y.mul_(2.0)  # in place, after the layer recorded its output
            z = self.trunk[3](self.trunk[2](self.trunk[1](y)))
            return [h(z).pow(2).mean() * (i + 1) for i, h in enumerate(self.heads)]

    infos = assert_same(InPlace, "mgda")
    assert infos[-1].engine == "gramian"


def test_gradient_accumulation_and_absent_tasks():
    def two_batches(model, step):
        return model(_inputs(step))

    def accumulate(build, engine):
        torch.manual_seed(0)
        model = build()
        opt = mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), "upgrad",
                                  engine=engine)
        for step in range(3):
            opt.zero_grad()
            for micro in range(2):
                losses = model(_inputs(10 * step + micro))
                given = {f"t{i}": loss for i, loss in enumerate(losses)}
                if micro == 1 and step == 1:
                    given.pop("t2")  # absent from the second micro-batch
                opt.backward(given)
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(accumulate(Trunk, "jacobian"), accumulate(Trunk, "gramian"), strict=True):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=2e-5)

    def absent(model, step):
        losses = model(_inputs(step))
        return losses if step != 1 else [losses[0], None, losses[2]]

    infos = assert_same(Trunk, "upgrad", batches=absent)
    assert infos[1].engine == "gramian" and infos[1].present == ["t0", "t2"]


class Poison(torch.autograd.Function):
    """Identity forward, NaN gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@pytest.mark.parametrize("strategy", ["upgrad", "nash_mtl", "mgda"])
def test_under_a_grad_scaler_the_engine_equals_the_unscaled_run_bit_for_bit(strategy):
    """GradScaler's scales are powers of two: the engine's Gramian of the scaled losses over the
    scale squared, and its update of the scaled losses, are the unscaled run's exactly."""

    def train(scaler):
        torch.manual_seed(0)
        model = Trunk()
        opt = mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), strategy,
                                  engine="gramian", scaler=scaler)
        for step in range(3):
            opt.zero_grad()
            info = opt.step(model(_inputs(step)))
            assert info.engine == "gramian"
            if scaler is not None:
                scaler.update()
        return list(model.parameters())

    plain = train(None)
    scaled = train(torch.amp.GradScaler("cpu", init_scale=2.0**14))
    for p, q in zip(plain, scaled, strict=True):
        assert torch.equal(p, q)


def test_a_non_finite_gradient_is_caught_as_with_J():
    class Poisoned(Trunk):
        def forward(self, x):
            losses = super().forward(x)
            z = self.trunk(x)
            losses[1] = losses[1] + Poison.apply(z).sum() * 0.0  # finite loss, NaN gradient
            return losses

    for engine in ("jacobian", "gramian"):
        with pytest.raises(FloatingPointError, match="non-finite gradient for task 't1'"):
            run(Poisoned, "upgrad", engine)


def test_transformer_encoder_with_pytorch_defaults_and_padding():
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.embed = nn.Linear(8, 16)
            self.heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(3))

        def forward(self, x):
            mask = torch.zeros(x.shape[1], x.shape[0], dtype=torch.bool)
            mask[0, -2:] = True  # the first sequence is padded
            z = self.encoder(self.embed(x), src_key_padding_mask=mask)
            return [h(z).pow(2).mean() * (i + 1) for i, h in enumerate(self.heads)]

    def batches(model, step):
        return model(torch.randn(6, 4, 8, generator=torch.Generator().manual_seed(step)))

    infos = assert_same(Encoder, "upgrad", batches=batches)
    assert infos[-1].engine == "gramian"


def test_hugging_face_bert_from_a_small_config():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = transformers.BertModel(config, add_pooling_layer=False)
            self.heads = nn.ModuleList(nn.Linear(16, 2) for _ in range(3))

        def forward(self, ids, mask):
            z = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
            return [h(z).logsumexp(-1).mean() * (i + 1) for i, h in enumerate(self.heads)]

    def batches(model, step):
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(0, 50, (3, 7), generator=g)
        mask = torch.ones(3, 7, dtype=torch.long)
        mask[0, 5:] = 0
        return model(ids, mask)

    infos = assert_same(Model, "mgda", batches=batches)
    assert infos[-1].engine == "gramian"


def test_recommender_with_embeddings():
    class Recommender(nn.Module):
        def __init__(self):
            super().__init__()
            self.users, self.items = nn.Embedding(30, 8), nn.Embedding(40, 8)
            self.bottom = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())
            self.towers = nn.ModuleList(
                nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 1)) for _ in range(2)
            )

        def forward(self, user, item, labels):
            z = self.bottom(torch.cat([self.users(user), self.items(item)], -1))
            return [
                nn.functional.binary_cross_entropy_with_logits(t(z).squeeze(-1), labels[:, i])
                for i, t in enumerate(self.towers)
            ]

    def batches(model, step):
        g = torch.Generator().manual_seed(step)
        return model(torch.randint(0, 30, (20,), generator=g),
                     torch.randint(0, 40, (20,), generator=g),
                     torch.randint(0, 2, (20, 2), generator=g).float())

    infos = assert_same(Recommender, "nash_mtl", batches=batches)
    assert infos[-1].engine == "gramian"


def test_attention_projections_are_found_on_the_graph():
    """nn.MultiheadAttention calls its projections through F.linear (no module call): the engine
    finds them as products on the graph, the fused in-projection's bias (added outside the
    product) stays with autograd."""
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    losses = [layer(torch.randn(3, 5, 16)).pow(2).mean() * (i + 1) for i in range(2)]
    partition = Partition(shared=list(layer.parameters()), specific=[[], []])
    found = {id(f[0].weight): f[0].bias for f in find_layers(losses, partition)}
    attention = layer.self_attn
    for weight in (attention.in_proj_weight, attention.out_proj.weight, layer.linear1.weight,
                   layer.linear2.weight):
        assert id(weight) in found
    assert found[id(attention.out_proj.weight)] is attention.out_proj.bias
    assert found[id(layer.linear1.weight)] is layer.linear1.bias


@pytest.mark.parametrize(("batch", "width", "expected"), [(16, 256, "gramian"),
                                                          (512, 8, "jacobian")])
def test_auto_takes_the_engine_where_its_work_is_smaller(batch, width, expected):
    """engine="auto": the engine where few rows meet wide layers (its blocks of G from the input
    kernel), the Jacobian path where many rows meet narrow layers (both would form the same
    weight gradients)."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
    heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(5))
    opt = mtlopt.MTLOptimizer(
        torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.1), "mgda"
    )
    z = trunk(torch.randn(batch, width))
    info = opt.step([h(z).pow(2).mean() for h in heads])
    assert info.engine == expected


def test_operation_ratio_counts_the_two_paths_work():
    """One layer Linear(w, w) with a bias, N rows, T tasks, counted by hand from the module's
    formulas: kernel N²·(w+1) + T·N²·w + T²·N·w, blocks T·N·w·(w+1) + T²·w·(w+1); the engine
    adds the copy of the output gradients (2·T·N·w) and the update (N·w·(w+1)), the J path its
    copy into J (2·T·w·(w+1))."""
    from mtlopt.autogram import operation_ratio

    w, tasks = 16, 3
    for rows in (4, 64):
        layer = nn.Linear(w, w)
        y = layer(torch.randn(rows, w))
        losses = [y.pow(k + 1).mean() for k in range(tasks)]
        partition = Partition(shared=list(layer.parameters()), specific=[[]] * tasks)
        found = find_layers(losses, partition)
        kernel = rows**2 * (w + 1) + tasks * rows**2 * w + tasks**2 * rows * w
        blocks = tasks * rows * w * (w + 1) + tasks**2 * w * (w + 1)
        engine = min(kernel, blocks) + 2 * tasks * rows * w + rows * w * (w + 1)
        jacobian = blocks + 2 * tasks * w * (w + 1)
        assert operation_ratio(found, tasks) == pytest.approx(engine / jacobian)
    assert operation_ratio(found, tasks) > 1  # 64 rows against width 16: blocks, plus copies


def test_auto_walks_the_graph_again_only_every_so_many_updates(monkeypatch):
    """Where the engine does not pay, "auto" remembers it: the graph is walked on the first
    update and again ENGINE_RECHECK updates later (or at once when the task count changes)."""
    import mtlopt.paths.gramian as path

    walks = []
    real = path.find_layers
    monkeypatch.setattr(path, "find_layers", lambda *a: walks.append(1) or real(*a))
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
    heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(3))
    opt = mtlopt.MTLOptimizer(
        torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.01), "mgda"
    )
    x = torch.randn(512, 8)  # many rows against width 8: the J path
    for step in range(path.ENGINE_RECHECK + 5):
        opt.zero_grad()
        z = trunk(x)
        losses = [h(z).pow(2).mean() for h in heads]
        if step == 3:
            losses[1] = None  # two tasks present
        assert opt.step(losses).engine == "jacobian"
    # updates 0, 3 (two tasks), 4 (three again) and 4 + ENGINE_RECHECK
    assert len(walks) == 4

    model = Trunk()
    with pytest.raises(ValueError, match="engine must be one of"):
        mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "mgda", engine="fast")
    with pytest.raises(ValueError, match="graddrop reads J itself"):
        mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "graddrop",
                            engine="gramian")
    _, infos = run(Trunk, "mgda", "jacobian")
    assert infos[0].engine == "jacobian"
    _, infos = run(Trunk, "graddrop", "auto")  # a strategy that reads J: the Jacobian path
    assert infos[0].engine == "jacobian"


def test_activation_checkpointing():
    """Non-reentrant checkpointing packs the products' saved inputs: reading them recomputes the
    segment, and the steps must still be the Jacobian path's."""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(Trunk):
        def forward(self, x):
            z = checkpoint(self.trunk, x, use_reentrant=False)
            return [h(z).pow(2).mean() * (i + 1) for i, h in enumerate(self.heads)]

    infos = assert_same(Checkpointed, "upgrad")
    assert infos[-1].engine == "gramian"
