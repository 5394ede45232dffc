"""Each block layout of issue 15 that broke DTME, reproduced with explicit blocks (as the issue
did): masks in every shape and convention, per-position extras, nested tensors, square masks when
B == N, dtype, per-layer width, task_view's decision, and the validation forward."""

from __future__ import annotations

import pytest
import torch
from encoder_zoo import transformers_or_skip
from token_models import Block, TinyViT, batch, losses
from torch import nn

import mtlopt
from mtlopt.tokens import ExpansionPlan, expand, find_blocks, is_streamed


def _train_through(net, blocks, data, steps=4, tasks=2, **kwargs):
    dtme = mtlopt.create(
        "dtme", blocks=blocks, num_tasks=tasks, analysis_steps=3, covariance_steps=1, **kwargs
    )
    opt = mtlopt.MTLOptimizer(torch.optim.SGD(net.parameters(), lr=1e-3), dtme)
    for s in range(steps):
        opt.zero_grad()
        outputs = data(net, s)
        opt.step([(o.float() ** 2).mean() for o in outputs])
    return dtme


class _HF(nn.Module):
    def __init__(self, encoder, dim=32, tasks=2):
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleList(nn.Linear(dim, 1) for _ in range(tasks))

    def forward(self, **batch):
        h = self.encoder(**batch).last_hidden_state
        return [head(mtlopt.task_view(h, i).mean(1)) for i, head in enumerate(self.heads)]


def _padded_text(model, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 90, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, 8:] = 0
    return model(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_bert_with_a_padded_batch(attention):
    """Was: 'The size of tensor a (18) must match the size of tensor b (12)' (4-D mask)."""
    t = transformers_or_skip()
    config = t.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        attn_implementation=attention,
    )
    model = _HF(t.BertModel(config))
    dtme = _train_through(model, model.encoder.encoder.layer, _padded_text)
    assert dtme.phase == "expanded" and dtme.plan.expansion_layers


def test_modernbert_rotary_pairs_are_extended():
    """Was: a crash on the (cos, sin) position embeddings passed to every layer."""
    t = transformers_or_skip()
    config = t.ModernBertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        cls_token_id=2,
        sep_token_id=1,
    )
    model = _HF(t.ModernBertModel(config))
    dtme = _train_through(model, model.encoder.layers, _padded_text)
    assert dtme.phase == "expanded"


def test_beit_shared_relative_position_bias_is_extended():
    t = transformers_or_skip()
    config = t.BeitConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        use_shared_relative_position_bias=True,
    )
    model = _HF(t.BeitModel(config))

    def data(m, seed):
        return m(
            pixel_values=torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
        )

    dtme = _train_through(model, find_blocks(model), data)
    assert dtme.phase == "expanded"


class _Encoder(nn.Module):
    def __init__(self, nested=True, tasks=2):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested)
        self.embed = nn.Linear(3, 16)
        self.heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(tasks))

    def forward(self, x, padding=None, mask=None):
        h = self.encoder(self.embed(x), mask=mask, src_key_padding_mask=padding)
        return [head(mtlopt.task_view(h, i).mean(1)) for i, head in enumerate(self.heads)]


def test_nested_tensor_encoder_runs_at_eval_with_padding():
    """Was: trains, then 'NestedTensorImpl doesn't support sizes' at eval-mode inference."""
    torch.manual_seed(0)
    model = _Encoder(nested=True)
    padding = torch.zeros(4, 5, dtype=torch.bool)
    padding[:, -2:] = True

    def data(m, seed):
        return m(batch(n=4, seed=seed)[0], padding)

    dtme = _train_through(model, model, data)
    assert dtme.phase == "expanded"
    model.eval()
    with torch.no_grad():
        outputs = model(batch(n=4)[0], padding)
    assert all(o.shape == (4, 1) and torch.isfinite(o).all() for o in outputs)


def test_square_mask_when_batch_equals_length():
    """Was: a square [N, N] mask repeated as if per-sample when B == N, modulation only."""
    torch.manual_seed(0)
    model = _Encoder(nested=False).eval()
    index = torch.arange(5)
    band = (index[:, None] - index[None, :]).abs() > 1  # True = masked (torch), not causal
    x = batch(n=5)[0]
    before = [o.detach() for o in model(x, mask=band)]
    expand(find_blocks(model), ExpansionPlan(2, [0, 1], []), dim=16)
    after = [o.detach() for o in model(x, mask=band)]
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bfloat16_model():
    """Was: 'mixed dtype (CPU): expect parameter to have scalar type of Float'."""
    torch.manual_seed(0)
    model = TinyViT().to(torch.bfloat16)
    expansion = expand(find_blocks(model), ExpansionPlan(2, [1], [2], 2), dim=16)
    assert all(p.dtype == torch.bfloat16 for p in expansion.parameters())
    outputs = model(batch()[0].to(torch.bfloat16))
    assert all(o.dtype == torch.bfloat16 for o in outputs)


class _Projected(nn.Module):
    def __init__(self, dim, out):
        super().__init__()
        self.block, self.proj = Block(dim), nn.Linear(dim, out)

    def forward(self, x):
        return self.proj(self.block(x))


class _Widening(nn.Module):
    def __init__(self, tasks=2):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.blocks = nn.ModuleList([Block(8), _Projected(8, 16), Block(16)])
        self.heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(tasks))

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return [head(mtlopt.task_view(h, i).mean(1)) for i, head in enumerate(self.heads)]


def test_blocks_of_different_widths():
    """Was: one width used for every layer."""
    torch.manual_seed(0)
    model = _Widening()
    dtme = _train_through(model, model.blocks, lambda m, s: m(batch(seed=s)[0]), rho=1.0)
    assert dtme.phase == "expanded"
    widths = {
        k: m.tokens[0].shape[-1] for k, m in dtme._expansion.modules.items() if k.endswith("tokens")
    }
    assert widths == {"0.tokens": 8, "1.tokens": 8, "2.tokens": 16}


class _AttendMaskBlock(nn.Module):
    """A block taking a Hugging Face-style [B, N] mask: 1 (or True) = attend."""

    def __init__(self, dim=16):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)

    def forward(self, x, attention_mask):
        keep = attention_mask.bool()
        return x + self.attn(x, x, x, key_padding_mask=~keep, need_weights=False)[0]


@pytest.mark.parametrize("dtype", [torch.long, torch.bool, torch.float32])
def test_task_tokens_are_attended_under_a_one_means_attend_mask(dtype):
    """Was silent: the task tokens were padded with 0 = masked, so they had no effect at all."""
    torch.manual_seed(0)
    blocks = nn.ModuleList([_AttendMaskBlock(), _AttendMaskBlock()])
    expansion = expand(blocks, ExpansionPlan(2, [], [0, 1], 2), dim=16)
    x = torch.randn(3, 5, 16)
    mask = torch.ones(3, 5, dtype=dtype)
    mask[0, 3:] = 0
    h = x
    for block in blocks:
        h = block(h, mask)
    loss = mtlopt.task_view(h, 0).pow(2).sum()
    grad = torch.autograd.grad(loss, list(expansion.modules["1.tokens"].tokens))[0]
    assert grad.abs().sum() > 0


def test_task_view_refuses_an_activation_of_another_batch():
    """Was: task_view decided by batch size alone and passed anything else through."""
    torch.manual_seed(0)
    model = TinyViT()
    _train_through(model, model, lambda m, s: m(batch(seed=s)[0]), model=model, layers=[2, 3])
    seen = {}

    def grab(module, args, output):
        seen["streams"] = is_streamed(output)
        with pytest.raises(ValueError, match="rows"):
            mtlopt.task_view(torch.zeros(3, 5, 16), 0)

    model.blocks[3].register_forward_hook(grab)
    model(batch(n=4)[0])
    assert seen["streams"]


class _UnknownExtra(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.inner = Block(dim)

    def forward(self, x, per_token_scale):
        return self.inner(x) * per_token_scale[..., None]


def test_an_unsupported_layout_fails_on_the_first_step_before_the_analysis():
    torch.manual_seed(0)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(3, 16)
            self.blocks = nn.ModuleList(_UnknownExtra() for _ in range(2))
            self.heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(2))

        def forward(self, x):
            h = self.embed(x)
            scale = torch.ones(x.shape[0], x.shape[1])
            for block in self.blocks:
                h = block(h, scale)
            return [head(mtlopt.task_view(h, i).mean(1)) for i, head in enumerate(self.heads)]

    model = Model()
    dtme = mtlopt.create(
        "dtme", blocks=model.blocks, num_tasks=2, analysis_steps=3, covariance_steps=1
    )
    opt = mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3), dtme)
    with pytest.raises(ValueError, match=r"per_token_scale.*expansion=False"):
        opt.step(losses(model, *batch()))
    assert dtme.steps == 0
    dtme = mtlopt.create(
        "dtme",
        blocks=model.blocks,
        num_tasks=2,
        analysis_steps=3,
        covariance_steps=1,
        expansion=False,
    )
    opt = mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3), dtme)
    for s in range(4):
        opt.zero_grad()
        opt.step(losses(model, *batch(seed=s)))
    assert dtme.phase == "expanded"


def test_hidden_states_before_and_after_the_branch():
    """output_hidden_states=True returns B-row states before the branch and K·B-row states after
    it; is_streamed says which, and task_view gives every one of them B rows."""
    t = transformers_or_skip()
    config = t.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
    )
    seen: list[tuple[list[bool], list[int]]] = []

    class Hidden(_HF):
        def forward(self, **batch):
            states = self.encoder(**batch, output_hidden_states=True).hidden_states
            seen.append(
                (
                    [is_streamed(h) for h in states],
                    [mtlopt.task_view(h, 1).shape[0] for h in states],
                )
            )
            h = states[-1]
            return [head(mtlopt.task_view(h, i).mean(1)) for i, head in enumerate(self.heads)]

    torch.manual_seed(0)
    model = Hidden(t.BertModel(config))
    dtme = _train_through(model, find_blocks(model), _padded_text, model=model, layers=[2, 3])
    assert dtme.plan.branch_layer == 2
    streamed, rows = seen[-1]
    assert streamed == [False, False, False, True, True]  # inputs of blocks 0-2, then after
    assert rows == [3] * 5
