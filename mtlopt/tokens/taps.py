"""Find a transformer's blocks and tap their input tokens."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

BLOCK_ATTRIBUTES = (
    "blocks",
    "layers",
    "encoder.layers",
    "encoder.layer",
    "transformer.layers",
    "transformer.blocks",
    "encoder.blocks",
)


def find_blocks(model: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    """The list of transformer blocks of ``model``.

    Looks for ``.blocks``, ``.layers``, ``.encoder.layers``, ``.encoder.layer``,
    ``.transformer.layers``, ``.transformer.blocks`` or ``.encoder.blocks`` (a ``ModuleList`` or
    ``Sequential``); a list or ``ModuleList`` of blocks is returned as it is.
    """
    if isinstance(model, (nn.ModuleList, list, tuple)):
        blocks = list(model)
    elif isinstance(model, nn.Sequential) and not any(
        isinstance(getattr(model, a, None), nn.Module) for a in ("blocks", "layers")
    ):
        blocks = list(model)
    else:
        blocks = []
        for path in BLOCK_ATTRIBUTES:
            found: Any = model
            for part in path.split("."):
                found = getattr(found, part, None)
            if isinstance(found, (nn.ModuleList, nn.Sequential)) and len(found) > 0:
                blocks = list(found)
                break
        if not blocks:
            raise ValueError(
                f"could not find the blocks of {type(model).__name__}: looked for "
                f"{', '.join('.' + a for a in BLOCK_ATTRIBUTES)}; pass the list of blocks instead"
            )
    for block in blocks:
        if isinstance(block, nn.TransformerEncoderLayer) and not block.self_attn.batch_first:
            raise ValueError(
                "nn.TransformerEncoderLayer must be built with batch_first=True: token taps read "
                "[B, N, p] inputs"
            )
    return blocks


class TokenTaps:
    """Forward pre-hooks that keep a reference to each block's input tokens ``[B, N, p]``.

    After a forward pass, ``inputs[d]`` is block d's input (part of the autograd graph, so task
    gradients with respect to it can be taken). An input that does not require grad (raw data fed
    straight to the first block) is replaced by a leaf copy that does, which changes nothing else.
    """

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        self.blocks = list(blocks)
        self.inputs: list[Tensor | None] = [None] * len(self.blocks)
        self._handles = [
            block.register_forward_pre_hook(self._hook(d), with_kwargs=True)
            for d, block in enumerate(self.blocks)
        ]

    def _hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            tokens = args[0] if args else kwargs.get("src", kwargs.get("x"))
            if not isinstance(tokens, Tensor) or tokens.dim() != 3:
                shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
                raise ValueError(
                    f"block {index} ({type(module).__name__}) received {shape} as its first input; "
                    "token taps need [B, N, p] tensors (batch first)"
                )
            if torch.is_grad_enabled() and not tokens.requires_grad:
                tokens = tokens.detach().requires_grad_(True)
                self.inputs[index] = tokens
                if args:
                    return (tokens, *args[1:]), kwargs
                return args, {**kwargs, ("src" if "src" in kwargs else "x"): tokens}
            self.inputs[index] = tokens
            return None

        return hook

    def captured(self) -> list[Tensor]:
        missing = [d for d, x in enumerate(self.inputs) if x is None]
        if missing:
            raise RuntimeError(f"blocks {missing} did not run since the taps were cleared")
        return list(self.inputs)  # type: ignore[arg-type]

    def clear(self) -> None:
        self.inputs = [None] * len(self.blocks)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    def __enter__(self) -> TokenTaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def token_gradients(
    losses: Sequence[Tensor], tokens: Sequence[Tensor], retain_graph: bool = True
) -> list[list[Tensor]]:
    """``grads[i][d]``: task i's gradient with respect to block d's input tokens (one pass per task)."""
    grads = []
    for i, loss in enumerate(losses):
        keep = retain_graph or i < len(losses) - 1
        grads.append(
            list(
                torch.autograd.grad(
                    loss, list(tokens), retain_graph=keep, allow_unused=True, materialize_grads=True
                )
            )
        )
    return grads
