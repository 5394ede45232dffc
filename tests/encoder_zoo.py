"""Encoders for DTME's compatibility table: Hugging Face families built from small configs with
random weights (no downloads), torch's nn.TransformerEncoder in its four layouts, the benchmarks'
models, a bfloat16 model and one with blocks of different widths. Each case trains DTME through
its analysis and expansion, then checks what a user relies on."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

import mtlopt
from mtlopt.tokens import single_task

TASKS = 2


def transformers_or_skip():
    """``transformers`` is an optional test dependency; CI installs it and sets
    MTLOPT_REQUIRE_TRANSFORMERS so that these tests run there."""
    stub = sys.modules.get("torchvision")
    hidden = stub is not None and getattr(stub, "__spec__", None) is None
    if hidden:  # tests/libmtl_oracle.py's stub has no spec, which transformers' probe rejects
        del sys.modules["torchvision"]
    try:
        import transformers
        from transformers.utils import import_utils

        import_utils.is_torchvision_available()  # probed (and cached) without the stub
    except ImportError:
        if os.environ.get("MTLOPT_REQUIRE_TRANSFORMERS"):
            raise
        pytest.skip("transformers is not installed (pip install 'transformers>=4.44')")
    finally:
        if hidden:
            sys.modules["torchvision"] = stub
    transformers.logging.set_verbosity_error()
    return transformers


class MultiTask(nn.Module):
    """An encoder and one linear head per task on its mean output token, read with task_view."""

    def __init__(self, encoder: nn.Module, dim: int, run: Callable[[nn.Module, Any], torch.Tensor]):
        super().__init__()
        self.encoder, self.run = encoder, run
        self.heads = nn.ModuleList(nn.Linear(dim, 1) for _ in range(TASKS))

    def forward(self, batch: Any) -> list[torch.Tensor]:
        hidden = self.run(self.encoder, batch)
        return [
            head(mtlopt.task_view(hidden, i).float().mean(1)).squeeze(-1)
            for i, head in enumerate(self.heads)
        ]


@dataclass
class Case:
    name: str
    config: str
    build: Callable[[], tuple[MultiTask, Callable[[int], Any]]]
    needs_transformers: bool = False
    expect: str = "works"
    kwargs: dict[str, Any] = field(default_factory=dict)


def _ids(seed: int, pad: bool = True, vocab: int = 90, n: int = 4, length: int = 9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    if pad:
        mask[0, 5:] = 0
        mask[2, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _pixels(seed: int, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(n, 3, 32, 32, generator=g)}


SMALL = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64)


def _hf(model_fn: Callable[[Any], nn.Module], data: Callable[[int], Any]):
    def build():
        t = transformers_or_skip()
        encoder = model_fn(t)
        model = MultiTask(encoder, 32, lambda m, batch: m(**batch).last_hidden_state)
        return model, data

    return build


def _text(seed: int):
    return _ids(seed)


def _torch_encoder(norm_first: bool, batch_first: bool):
    def build():
        layer = nn.TransformerEncoderLayer(
            32, 2, 64, dropout=0.1, batch_first=batch_first, norm_first=norm_first
        )
        encoder = nn.TransformerEncoder(layer, 4)  # enable_nested_tensor=True, PyTorch's default
        embed = nn.Embedding(90, 32)

        def run(m, batch):
            x = embed(batch["input_ids"])
            padding = batch["attention_mask"] == 0
            if not batch_first:
                return m(x.transpose(0, 1), src_key_padding_mask=padding).transpose(0, 1)
            return m(x, src_key_padding_mask=padding)

        model = MultiTask(encoder, 32, run)
        model.embed = embed
        return model, _text

    return build


def _benchmark(kind: str):
    def build():
        from benchmarks.models import SetTransformer, ViT

        if kind == "vit":
            net = ViT([1] * TASKS, dim=32, heads=2)

            def data(seed):
                return torch.randn(4, 36, 36, generator=torch.Generator().manual_seed(seed))

            return _Native(net, lambda m, x: m(x)), data
        net = SetTransformer(TASKS, dim=32, heads=2)

        def data(seed):
            g = torch.Generator().manual_seed(seed)
            atoms = torch.randint(0, 5, (4, 12), generator=g)
            atoms[:, 8:] = -1
            return atoms, torch.randn(4, 12, 3, generator=g)

        return _Native(net, lambda m, b: m(*b)), data

    return build


class _Native(nn.Module):
    """A model whose own heads already read task_view (the benchmarks' models)."""

    def __init__(self, net: nn.Module, run: Callable) -> None:
        super().__init__()
        self.net, self.run = net, run

    def forward(self, batch):
        return [o.reshape(o.shape[0], -1).mean(1) for o in self.run(self.net, batch)]


def _bf16():
    from token_models import TinyViT

    net = TinyViT(dim=32).to(torch.bfloat16)

    def data(seed):
        return torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(seed)).to(
            torch.bfloat16
        )

    return _Native(net, lambda m, x: [o.float() for o in m(x)]), data


class _Widening(nn.Module):
    """Hierarchical widths: two blocks at width 16, a projection, two blocks at width 32."""

    def __init__(self) -> None:
        super().__init__()
        from token_models import Block

        self.embed = nn.Linear(3, 16)
        self.blocks = nn.ModuleList([Block(16), Block(16), _Projected(16, 32), Block(32)])
        self.heads = nn.ModuleList(nn.Linear(32, 1) for _ in range(TASKS))

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return [
            head(mtlopt.task_view(h, i).mean(1)).squeeze(-1) for i, head in enumerate(self.heads)
        ]


class _Projected(nn.Module):
    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        from token_models import Block

        self.block, self.proj = Block(dim), nn.Linear(dim, out)

    def forward(self, x):
        return self.proj(self.block(x))


def _widening():
    def data(seed):
        return torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(seed))

    return _Widening(), data


def cases() -> list[Case]:
    pads = "padded batch"
    out = [
        Case(
            "BERT",
            f"eager, {pads}",
            _hf(
                lambda t: t.BertModel(
                    t.BertConfig(vocab_size=100, **SMALL, attn_implementation="eager")
                ),
                _text,
            ),
            True,
        ),
        Case(
            "BERT",
            f"sdpa, {pads}",
            _hf(
                lambda t: t.BertModel(
                    t.BertConfig(vocab_size=100, **SMALL, attn_implementation="sdpa")
                ),
                _text,
            ),
            True,
        ),
        Case(
            "RoBERTa",
            pads,
            _hf(lambda t: t.RobertaModel(t.RobertaConfig(vocab_size=100, **SMALL)), _text),
            True,
        ),
        Case(
            "DistilBERT",
            pads,
            _hf(
                lambda t: t.DistilBertModel(
                    t.DistilBertConfig(vocab_size=100, dim=32, n_layers=4, n_heads=2, hidden_dim=64)
                ),
                _text,
            ),
            True,
        ),
        Case(
            "ModernBERT",
            f"rotary, {pads}",
            _hf(
                lambda t: t.ModernBertModel(
                    t.ModernBertConfig(
                        vocab_size=100,
                        **SMALL,
                        global_attn_every_n_layers=2,
                        local_attention=4,
                        pad_token_id=0,
                        eos_token_id=1,
                        bos_token_id=2,
                        cls_token_id=2,
                        sep_token_id=1,
                    )
                ),
                _text,
            ),
            True,
        ),
        Case(
            "GPT-2 (causal)",
            f"sdpa, {pads}",
            _hf(
                lambda t: t.GPT2Model(
                    t.GPT2Config(vocab_size=100, n_embd=32, n_layer=4, n_head=2, use_cache=False)
                ),
                _text,
            ),
            True,
        ),
        Case(
            "GPT-2 (causal)",
            "sdpa, no padding",
            _hf(
                lambda t: t.GPT2Model(
                    t.GPT2Config(vocab_size=100, n_embd=32, n_layer=4, n_head=2, use_cache=False)
                ),
                lambda s: _ids(s, pad=False),
            ),
            True,
            "refused",
        ),
        Case(
            "GPT-2 (causal)",
            "eager attention, no padding",
            _hf(
                lambda t: t.GPT2Model(
                    t.GPT2Config(
                        vocab_size=100,
                        n_embd=32,
                        n_layer=4,
                        n_head=2,
                        use_cache=False,
                        attn_implementation="eager",
                    )
                ),
                lambda s: _ids(s, pad=False),
            ),
            True,
        ),
        Case(
            "ViT",
            "",
            _hf(lambda t: t.ViTModel(t.ViTConfig(image_size=32, patch_size=8, **SMALL)), _pixels),
            True,
        ),
        Case(
            "DeiT",
            "",
            _hf(lambda t: t.DeiTModel(t.DeiTConfig(image_size=32, patch_size=8, **SMALL)), _pixels),
            True,
        ),
        Case(
            "BEiT",
            "shared relative position bias",
            _hf(
                lambda t: t.BeitModel(
                    t.BeitConfig(
                        image_size=32, patch_size=8, **SMALL, use_shared_relative_position_bias=True
                    )
                ),
                _pixels,
            ),
            True,
        ),
        Case(
            "BEiT",
            "per-layer relative position bias",
            _hf(
                lambda t: t.BeitModel(
                    t.BeitConfig(
                        image_size=32, patch_size=8, **SMALL, use_relative_position_bias=True
                    )
                ),
                _pixels,
            ),
            True,
            "refused",
        ),
    ]
    for norm_first in (False, True):
        for batch_first in (True, False):
            out.append(
                Case(
                    "nn.TransformerEncoder",
                    f"{'pre' if norm_first else 'post'}-norm, batch_first={batch_first}, "
                    f"nested tensor on, {pads}",
                    _torch_encoder(norm_first, batch_first),
                )
            )
    out += [
        Case("benchmarks ViT", "MultiFashion model", _benchmark("vit")),
        Case("benchmarks set transformer", "QM9 model, padded atoms", _benchmark("set")),
        Case("bfloat16 model", "pre-norm ViT blocks in bf16", _bf16),
        Case("blocks of different widths", "16 → 32 channels", _widening),
    ]
    return out


def _losses(model: nn.Module, batch: Any, seed: int) -> list[torch.Tensor]:
    outputs = model(batch)
    g = torch.Generator().manual_seed(seed)
    return [((o.float() - torch.randn(o.shape, generator=g)) ** 2).mean() for o in outputs]


def run_case(case: Case) -> dict[str, str]:
    """Train DTME through the analysis on the case's model and check the expanded model."""
    torch.manual_seed(0)
    model, data = case.build()
    row = {"model": case.name, "configuration": case.config}
    try:
        dtme = mtlopt.create(
            "dtme",
            model=model,
            analysis_steps=3,
            covariance_steps=1,
            rho=0.5,
            tokens_per_task=2,
            **case.kwargs,
        )
    except ValueError as error:
        row.update(status="refused when DTME is created", detail=_short(error))
        return row
    opt = mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3), dtme)
    try:
        for step in range(4):
            opt.zero_grad()
            opt.step(_losses(model, data(step), step))
    except ValueError as error:
        if dtme.phase == "expanded" or dtme.steps > 0:
            raise
        fallback = _modulation_only(case)
        row.update(
            status="refused at the first step (validation)",
            detail=f"{_short(error)}; with expansion=False: {fallback}",
        )
        return row
    assert dtme.phase == "expanded", dtme.phase
    plan = dtme.plan
    assert plan is not None and plan.expansion_layers and plan.modulation_layers
    batch = data(50)
    model.train()
    losses = _losses(model, batch, 50)
    # Proposition 2 on this model: task i's tokens get gradient from task i only, and some.
    module = dtme._expansion.modules[f"{plan.expansion_layers[0]}.tokens"]
    for i, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, list(module.tokens), retain_graph=True, allow_unused=True)
        for j, g in enumerate(grads):
            own = g is not None and bool(g.abs().sum() > 0)
            assert own == (i == j), f"task {i}'s loss and task {j}'s tokens"
    model.eval()
    with torch.no_grad():
        every = [o.float() for o in model(batch)]
        for i in range(TASKS):
            with single_task(i):
                alone = model(batch)[i].float()
            torch.testing.assert_close(alone, every[i], rtol=2e-2, atol=2e-2)
    row.update(
        status="works: modulation + task tokens",
        detail="Proposition 2, eval mode and single-task inference checked",
    )
    return row


def _modulation_only(case: Case) -> str:
    """The fallback a refusal names: token modulation only, trained and checked likewise."""
    torch.manual_seed(0)
    model, data = case.build()
    opt = mtlopt.MTLOptimizer(
        torch.optim.SGD(model.parameters(), lr=1e-3),
        "dtme",
        model=model,
        analysis_steps=3,
        covariance_steps=1,
        expansion=False,
        **case.kwargs,
    )
    for step in range(4):
        opt.zero_grad()
        opt.step(_losses(model, data(step), step))
    assert opt.strategy.phase == "expanded" and opt.strategy.plan.modulation_layers
    model.eval()
    with torch.no_grad():
        every = [o.float() for o in model(data(50))]
        with single_task(1):
            alone = model(data(50))[1].float()
    torch.testing.assert_close(alone, every[1], rtol=2e-2, atol=2e-2)
    return "modulation works (single-task inference checked)"


def _short(error: Exception) -> str:
    text = str(error).split("; ")[0]
    return text if len(text) < 130 else text[:127] + "..."


def table(rows: list[dict[str, str]]) -> str:
    lines = ["| model | configuration | DTME | detail |", "|---|---|---|---|"]
    lines += [
        f"| {r['model']} | {r['configuration']} | {r['status']} | {r['detail']} |" for r in rows
    ]
    return "\n".join(lines)
