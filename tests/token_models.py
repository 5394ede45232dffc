"""Three small transformers with different block layouts, and multi-task heads using task_view."""

from __future__ import annotations

import torch
from torch import nn

import mtlopt


class Block(nn.Module):
    """A pre-norm ViT block."""

    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class Heads(nn.Module):
    """One linear head per task on the mean token of that task's stream."""

    def __init__(self, dim: int, tasks: int, outputs: int = 1) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(dim, outputs) for _ in range(tasks))

    def forward(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        return [head(mtlopt.task_view(tokens, i).mean(1)) for i, head in enumerate(self.heads)]


class TinyViT(nn.Module):
    """``.blocks`` layout (timm style)."""

    def __init__(
        self, tasks: int = 2, dim: int = 16, depth: int = 4, tokens: int = 5, inputs: int = 3
    ):
        super().__init__()
        self.embed = nn.Linear(inputs, dim)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = Heads(dim, tasks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.embed(x) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


class TorchEncoderModel(nn.Module):
    """``.encoder.layers`` layout: torch's nn.TransformerEncoder, batch first."""

    def __init__(self, tasks: int = 2, dim: int = 16, depth: int = 4, inputs: int = 3):
        super().__init__()
        self.embed = nn.Linear(inputs, dim)
        layer = nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = Heads(dim, tasks)

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> list[torch.Tensor]:
        return self.head(self.encoder(self.embed(x), src_key_padding_mask=padding))


class _Layer(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.block = Block(dim)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.block(hidden_states),)  # BERT-style layers return tuples


class _Encoder(nn.Module):
    def __init__(self, dim: int, depth: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(dim) for _ in range(depth))


class BertStyleModel(nn.Module):
    """``.encoder.layer`` layout (Hugging Face BERT style), layers returning tuples."""

    def __init__(self, tasks: int = 2, dim: int = 16, depth: int = 4, inputs: int = 3):
        super().__init__()
        self.embed = nn.Linear(inputs, dim)
        self.encoder = _Encoder(dim, depth)
        self.head = Heads(dim, tasks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.embed(x)
        for layer in self.encoder.layer:
            h = layer(h)[0]
        return self.head(h)


MODELS = {"vit": TinyViT, "torch_encoder": TorchEncoderModel, "bert_style": BertStyleModel}


def batch(n: int = 8, tokens: int = 5, inputs: int = 3, tasks: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, tokens, inputs, generator=g), torch.randn(n, tasks, generator=g)


def losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    return [((out.squeeze(-1) - y[:, i]) ** 2).mean() for i, out in enumerate(model(x))]
