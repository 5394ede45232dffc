"""Small transformers written in the project (no timm/torchvision): a ViT and a set transformer.

Both expose ``.blocks`` so token-space methods (DTME-MTL) find them, and their heads read each
task's stream with :func:`mtlopt.task_view`, so they work before and after a DTME expansion.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import mtlopt


class Block(nn.Module):
    """Pre-norm transformer block; ``padding`` is a [B, N] key padding mask (True = ignore)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
        )

    def forward(self, x: Tensor, padding: Tensor | None = None) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, key_padding_mask=padding, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A small ViT over non-overlapping patches, one linear head per task on the mean token."""

    def __init__(
        self,
        classes: list[int],
        image: int = 36,
        patch: int = 6,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
    ) -> None:
        super().__init__()
        self.patch = patch
        tokens = (image // patch) ** 2
        self.embed = nn.Linear(patch * patch, dim)
        self.pos = nn.Parameter(torch.zeros(1, tokens, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.heads = nn.ModuleList(nn.Linear(dim, c) for c in classes)

    def forward(self, images: Tensor) -> list[Tensor]:
        return self.decode(self.encode(images))

    def encode(self, images: Tensor) -> Tensor:
        """The shared token representation [B, N, dim] (representation mode's features)."""
        b, height, width = images.shape
        p = self.patch
        patches = images.reshape(b, height // p, p, width // p, p).permute(0, 1, 3, 2, 4)
        x = self.embed(patches.reshape(b, -1, p * p)) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def decode(self, x: Tensor) -> list[Tensor]:
        return [head(mtlopt.task_view(x, i).mean(1)) for i, head in enumerate(self.heads)]


class SetTransformer(nn.Module):
    """Atoms as tokens (type embedding + coordinate projection), masked mean pooling, one scalar
    head per target."""

    def __init__(
        self, targets: int, atom_types: int = 5, dim: int = 64, depth: int = 4, heads: int = 4
    ) -> None:
        super().__init__()
        self.atom = nn.Embedding(atom_types, dim)
        self.position = nn.Sequential(nn.Linear(4, dim), nn.GELU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.heads = nn.ModuleList(nn.Linear(dim, 1) for _ in range(targets))

    def forward(self, atoms: Tensor, positions: Tensor) -> list[Tensor]:
        return self.decode(self.encode(atoms, positions), atoms)

    def encode(self, atoms: Tensor, positions: Tensor) -> Tensor:
        """The shared token representation [B, 29, dim] (representation mode's features)."""
        padding = atoms < 0
        distance = positions.norm(dim=-1, keepdim=True)
        x = self.atom(atoms.clamp_min(0)) + self.position(torch.cat([positions, distance], -1))
        for block in self.blocks:
            x = block(x, padding=padding)
        return self.norm(x)

    def decode(self, x: Tensor, atoms: Tensor) -> list[Tensor]:
        keep = (~(atoms < 0)).unsqueeze(-1).to(x.dtype)
        outputs = []
        for i, head in enumerate(self.heads):
            stream = mtlopt.task_view(x, i)
            pooled = (stream * keep).sum(1) / keep.sum(1)
            outputs.append(head(pooled).squeeze(-1))
        return outputs
