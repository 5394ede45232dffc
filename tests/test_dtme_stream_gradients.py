"""DTME with a gradient base: every task's gradient from one backward through the K task streams
(mtlopt.tokens.stream_gradients) equals the brute-force per-task gradients of the stacked model,
``autograd.grad(L_k, θ)`` for each task over all K streams, and the bases' updates follow."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from encoder_zoo import _ids, transformers_or_skip
from torch import nn

import mtlopt
from mtlopt.tokens.stream_calls import take_record
from mtlopt.tokens.stream_gradients import stream_task_gradients


class Heads(nn.Module):
    """One linear head per task on the mean of its stream's tokens."""

    def __init__(self, dim: int, tasks: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(dim, 1) for _ in range(tasks))

    def forward(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        return [
            h(mtlopt.task_view(hidden, i).mean(1)).squeeze(-1) for i, h in enumerate(self.heads)
        ]


class Vit(nn.Module):
    """The benchmarks' ViT (pre-norm blocks, final LayerNorm shared by every stream)."""

    def __init__(self, tasks: int) -> None:
        super().__init__()
        from benchmarks.models import ViT

        self.net = ViT([1] * tasks, image=24, patch=6, dim=16, heads=2)

    def forward(self, x):
        return [o.squeeze(-1) for o in self.net(x)]


class TorchEncoder(nn.Module):
    """nn.TransformerEncoder, sequence first, with a padding mask."""

    def __init__(self, tasks: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(90, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=False)
        self.encoder = nn.TransformerEncoder(layer, 4)
        self.norm = nn.LayerNorm(16)
        self.head = Heads(16, tasks)

    def forward(self, batch):
        x = self.embed(batch["input_ids"]).transpose(0, 1)
        hidden = self.encoder(x, src_key_padding_mask=batch["attention_mask"] == 0)
        return self.head(self.norm(hidden.transpose(0, 1)))


class Bert(nn.Module):
    """A small Hugging Face BertModel (eager attention, padded batch)."""

    def __init__(self, tasks: int) -> None:
        super().__init__()
        t = transformers_or_skip()
        config = t.BertConfig(
            vocab_size=100,
            hidden_size=16,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=32,
            attn_implementation="eager",
        )
        self.bert = t.BertModel(config, add_pooling_layer=False)
        self.head = Heads(16, tasks)

    def forward(self, batch):
        return self.head(self.bert(**batch).last_hidden_state)


def _images(seed: int):
    return torch.randn(4, 24, 24, generator=torch.Generator().manual_seed(seed))


MODELS = {"vit": (Vit, _images), "torch_encoder": (TorchEncoder, _ids), "bert": (Bert, _ids)}


def _losses(model, batch, seed, tasks):
    outputs = model(batch)
    g = torch.Generator().manual_seed(1000 + seed)
    targets = torch.randn(outputs[0].shape[0], tasks, generator=g).to(outputs[0].dtype)
    return [((o - targets[:, i]) ** 2).mean() for i, o in enumerate(outputs)]


def _expanded(name, tasks, layers, base="pcgrad", dtype=torch.float32, **kwargs):
    """A model taken through DTME's analysis to its expansion (branch at min(layers))."""
    build, data = MODELS[name]
    torch.manual_seed(0)
    model = build(tasks).to(dtype)
    dtme = mtlopt.create(
        "dtme",
        model=model,
        num_tasks=tasks,
        base=base,
        analysis_steps=3,
        covariance_steps=1,
        tokens_per_task=2,
        layers=layers,
        **kwargs,
    )
    opt = mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=1e-2), dtme)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the expensive-plan warning
        for step in range(3):
            torch.manual_seed(step)
            opt.zero_grad()
            opt.step(_losses(model, _cast(data(step), dtype), step, tasks))
    assert dtme.phase == "expanded" and dtme.plan.branch_layer == min(layers)
    return model, opt, dtme, lambda seed: _cast(data(seed), dtype)


def _cast(batch, dtype):
    return batch.to(dtype) if isinstance(batch, torch.Tensor) else batch


def _per_task_brute_force(model, losses, trainable):
    return [
        torch.autograd.grad(loss, trainable, retain_graph=True, allow_unused=True)
        for loss in losses
    ]


def _full(found, trainable, partition):
    """Each task's gradient of every trainable parameter from a TaskGradients (zeros if absent)."""
    ranges = partition.column_ranges()
    out = []
    for k, own in enumerate(found.own):
        grads = []
        for p in trainable:
            if id(p) in ranges:
                start, stop = ranges[id(p)]
                grads.append(found.jacobian[k, start:stop].view_as(p))
            else:
                grads.append(own.get(id(p), torch.zeros_like(p)))
        out.append(grads)
    return out


@pytest.mark.parametrize("tasks", [2, 3, 5])
@pytest.mark.parametrize("layers", [[0, 2], [2, 3]], ids=["branch0", "branch2"])
@pytest.mark.parametrize("name", list(MODELS))
def test_stream_gradients_equal_the_per_task_gradients(name, layers, tasks):
    model, opt, dtme, data = _expanded(name, tasks, layers)
    model.eval()  # no dropout: both passes see the same function
    trainable = opt._trainable()
    partition = opt._partition
    batch = data(50)

    dtme._expansion.call_per_stream(False)  # today's path: the stacked streams, K backwards
    expected = _per_task_brute_force(model, _losses(model, batch, 50, tasks), trainable)
    dtme._expansion.call_per_stream(True)
    losses = _losses(model, batch, 50, tasks)
    found = stream_task_gradients(losses, trainable, partition, take_record())
    assert not isinstance(found, str), found
    got = _full(found, trainable, partition)
    for k in range(tasks):
        mine = torch.cat([g.reshape(-1) for g in got[k]])
        theirs = torch.cat(
            [
                (torch.zeros_like(p) if g is None else g).reshape(-1)
                for g, p in zip(expected[k], trainable, strict=True)
            ]
        )
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6 * float(theirs.abs().max()))
        assert float(theirs.abs().max()) > 0
    # what each task reaches: its own head, not the others'
    heads = [m for m in model.modules() if isinstance(m, Heads)] or [None]
    head_params = (
        [list(h.parameters()) for h in heads[0].heads]
        if heads[0] is not None
        else [list(h.parameters()) for h in model.net.heads]
    )
    index = {id(p): i for i, p in enumerate(trainable)}
    for k in range(tasks):
        for j in range(tasks):
            assert found.reached[k][index[id(head_params[j][0])]] == (j == k)


def test_float64_equality_to_rounding():
    model, opt, dtme, data = _expanded("vit", 3, [0, 2], dtype=torch.float64)
    trainable, partition = opt._trainable(), opt._partition
    dtme._expansion.call_per_stream(False)
    expected = _per_task_brute_force(model, _losses(model, data(7), 7, 3), trainable)
    dtme._expansion.call_per_stream(True)
    found = stream_task_gradients(
        _losses(model, data(7), 7, 3), trainable, partition, take_record()
    )
    got = _full(found, trainable, partition)
    for k in range(3):
        for g, e, p in zip(got[k], expected[k], trainable, strict=True):
            e = torch.zeros_like(p) if e is None else e
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12 * (1 + float(e.abs().max())))


@pytest.mark.parametrize("base", ["pcgrad", "mgda", "upgrad", "cagrad", "nash_mtl"])
@pytest.mark.parametrize("name", ["vit", "torch_encoder", "bert"])
def test_the_bases_update_is_unchanged(name, base):
    """The same run with and without the stream path writes the same .grad after the expansion."""
    tasks = 3
    runs = {}
    for streams in (True, False):
        model, opt, dtme, data = _expanded(
            name, tasks, [0, 2], base=base, stream_gradients=streams
        )
        model.eval()
        torch.manual_seed(123)  # PCGrad's task order
        opt.zero_grad()
        opt.backward(_losses(model, data(60), 60, tasks))
        runs[streams] = [p.grad.clone() for p in opt._trainable()]
        assert dtme.gradient_path == ("streams" if streams else "per task")
    for a, b in zip(runs[True], runs[False], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * (1 + float(b.abs().max())))


def test_training_with_streams_runs_one_backward_per_step_and_matches_outputs():
    model, opt, dtme, data = _expanded("vit", 3, [0, 2])
    calls = []
    model.net.blocks[1].register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    for step in range(3, 5):
        opt.zero_grad()
        opt.step(_losses(model, data(step), step, 3))
    assert dtme.gradient_path == "streams"
    # the stacked call (no grad) and the per-stream calls (grad) compute the same outputs
    model.eval()
    with torch.no_grad():
        stacked = model(data(9))
    streamed = model(data(9))
    take_record()
    for a, b in zip(stacked, streamed, strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
    # a copied model runs its own blocks
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.1)
        assert not torch.allclose(twin(data(9))[0], model(data(9))[0])
    model.zero_grad(set_to_none=True)
    twin(data(9))[0].sum().backward()
    take_record()
    assert all(p.grad is None for p in model.net.blocks[1].parameters())


class MixingHeads(nn.Module):
    """Heads that read the mean over every row of the batch: the streams are not separate."""

    def __init__(self, tasks):
        super().__init__()
        from benchmarks.models import ViT

        self.net = ViT([1] * tasks, image=24, patch=6, dim=16, heads=2)

    def forward(self, x):
        z = self.net.encode(x)
        z = z - 0.5 * z.mean(0, keepdim=True)  # mixes the K·B rows of all streams
        return [o.squeeze(-1) for o in self.net.decode(z)]


def test_streams_that_mix_fall_back_on_the_per_task_path_and_say_so():
    MODELS["mixing"] = (MixingHeads, _images)
    try:
        model, opt, dtme, data = _expanded("mixing", 3, [0, 2])
        with pytest.warns(UserWarning, match="differ from the per-task ones"):
            opt.zero_grad()
            opt.step(_losses(model, data(5), 5, 3))
        assert dtme.gradient_path.startswith("per task") and not dtme.stream_gradients
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt.zero_grad()
            opt.step(_losses(model, data(6), 6, 3))
    finally:
        del MODELS["mixing"]


def test_ew_base_keeps_the_stacked_call():
    model, opt, dtme, data = _expanded("vit", 3, [0, 2], base="ew")
    rows = []
    model.net.blocks[1].register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    opt.zero_grad()
    opt.step(_losses(model, data(5), 5, 3))
    assert dtme.gradient_path == "per task"
    assert take_record() is None


@pytest.mark.parametrize("name", ["vit", "torch_encoder"])
def test_open_token_gates_give_the_per_task_gradients_on_the_streams(name):
    """The TokenGate blends each block's output with and without the task tokens: on the stream
    path both calls run per stream on the same parameter aliases, and the gates (task-specific)
    keep their own gradients."""
    tasks = 3
    model, opt, dtme, data = _expanded(name, tasks, [0, 2])
    gates = dtme._expansion.gate_parameters()
    assert gates, "the default plan's task tokens are gated"
    with torch.no_grad():
        for i, gate in enumerate(gates):
            gate.fill_(0.3 + 0.1 * (i % 3))
    model.eval()
    trainable = opt._trainable()
    partition = opt._partition
    batch = data(60)
    dtme._expansion.call_per_stream(False)
    expected = _per_task_brute_force(model, _losses(model, batch, 60, tasks), trainable)
    dtme._expansion.call_per_stream(True)
    found = stream_task_gradients(
        _losses(model, batch, 60, tasks), trainable, partition, take_record()
    )
    assert not isinstance(found, str), found
    got = _full(found, trainable, partition)
    index = {id(p): i for i, p in enumerate(trainable)}
    for k in range(tasks):
        for p in trainable:
            want = expected[k][index[id(p)]]
            want = torch.zeros_like(p) if want is None else want
            torch.testing.assert_close(
                got[k][index[id(p)]], want, rtol=1e-5, atol=1e-6 * (float(want.abs().max()) + 1e-12)
            )
        assert any(float(expected[k][index[id(g)]].abs()) > 0 for g in gates if id(g) in index)
