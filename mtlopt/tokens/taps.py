"""Find a transformer's blocks and tap their input tokens."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .extras import named_extras, real_tokens
from .streams import STREAMS

TOKEN_NAMES = ("src", "x", "hidden_states")

BLOCK_ATTRIBUTES = (
    "blocks",
    "layers",
    "encoder.layers",
    "encoder.layer",
    "transformer.layers",
    "transformer.blocks",
    "encoder.blocks",
    "transformer.layer",
    "transformer.h",
    "h",
    "model.layers",
    "model.encoder.layers",
    "model.encoder.layer",
)


def disable_nested_tensor(model: nn.Module) -> None:
    """Switch off the nested-tensor fast path of every ``nn.TransformerEncoder`` in ``model`` (in
    eval mode with a padding mask it hands its layers nested tensors, which have no token axis for
    DTME's streams and task tokens). The fast path changes speed only, not outputs."""
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False


def find_blocks(model: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    """The list of transformer blocks of ``model``.

    Looks for the attributes of :data:`BLOCK_ATTRIBUTES` in order (timm's ``.blocks``, torch's
    ``.encoder.layers``, Hugging Face's ``.encoder.layer``, ``.layers``, ``.transformer.layer``,
    ``.h``, ...; a ``ModuleList`` or ``Sequential``); a list or ``ModuleList`` of blocks is returned
    as it is. Torch's ``nn.TransformerEncoder`` modules inside ``model`` get their nested-tensor
    fast path switched off (a speed-only path whose nested inputs have no token axis to extend;
    outputs are unchanged).
    """
    if isinstance(model, nn.Module):
        disable_nested_tensor(model)
    if isinstance(model, (nn.ModuleList, list, tuple)):
        blocks = list(model)
    elif isinstance(model, nn.Sequential) and not any(
        isinstance(getattr(model, a, None), nn.Module) for a in ("blocks", "layers")
    ):
        blocks = list(model)
    else:
        blocks = _search(model)
        if not blocks:
            raise ValueError(
                f"could not find the blocks of {type(model).__name__}: looked for "
                f"{', '.join('.' + a for a in BLOCK_ATTRIBUTES)} on it and on its sub-modules; "
                "pass the list of blocks instead (blocks=model.path.to.layers)"
            )
    return blocks


def batch_axis(block: nn.Module) -> int:
    """The batch axis of a block's tokens: 1 for torch layers built with ``batch_first=False``
    (``[N, B, p]``), else 0."""
    attention = getattr(block, "self_attn", None)
    if isinstance(block, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) and isinstance(
        attention, nn.MultiheadAttention
    ):
        return 0 if attention.batch_first else 1
    return 0


def _search(model: nn.Module) -> list[nn.Module]:
    """The blocks at the shallowest sub-module (breadth first) that has one of the attributes."""
    level: list[nn.Module] = [model]
    seen: set[int] = set()
    while level:
        for module in level:
            for path in BLOCK_ATTRIBUTES:
                found: Any = module
                for part in path.split("."):
                    found = getattr(found, part, None)
                if isinstance(found, (nn.ModuleList, nn.Sequential)) and len(found) > 0:
                    return list(found)
        seen.update(id(m) for m in level)
        level = [c for m in level for c in m.children() if id(c) not in seen]
    return []


class TokenTaps:
    """Forward pre-hooks that keep a reference to each block's input tokens ``[B, N, p]``.

    After a forward pass, ``inputs[d]`` is block d's input (part of the autograd graph, so task
    gradients with respect to it can be taken) and ``real[d]`` the ``[B, N]`` mask of its real
    tokens read from the block's attention or padding mask (``None`` if it has none). An input that
    does not require grad (raw data fed straight to the first block) is replaced by a leaf copy that
    does, which changes nothing else. With ``keep_calls``, ``calls[d]`` holds the block's
    arguments (for a validation forward).
    """

    def __init__(
        self, blocks: Sequence[nn.Module], mask_conventions: dict[str, bool] | None = None
    ) -> None:
        self.blocks = list(blocks)
        self.conventions = dict(mask_conventions or {})
        self.keep_calls = False
        self.inputs: list[Tensor | None] = [None] * len(self.blocks)
        self.real: list[Tensor | None] = [None] * len(self.blocks)
        self.calls: list[tuple[tuple, dict] | None] = [None] * len(self.blocks)
        self.axes = [batch_axis(b) for b in self.blocks]
        self._handles = [
            block.register_forward_pre_hook(self._hook(d), with_kwargs=True)
            for d, block in enumerate(self.blocks)
        ]

    def _hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if index == 0 and not _expanded(self.blocks):
                STREAMS.reset()  # a new forward pass: forget any earlier model's streams
            key = next((n for n in TOKEN_NAMES if n in kwargs), "x") if not args else None
            tokens = args[0] if args else kwargs.get(key)
            if not isinstance(tokens, Tensor) or tokens.is_nested or tokens.dim() != 3:
                if isinstance(tokens, Tensor) and tokens.is_nested:
                    shape = "a nested tensor (nn.TransformerEncoder(enable_nested_tensor=True))"
                else:
                    shape = (
                        tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
                    )
                raise ValueError(
                    f"block {index} ({type(module).__name__}) received {shape} as its first input; "
                    "token taps need padded [B, N, p] tensors (batch first)"
                )
            extras = named_extras(module, args, kwargs)
            axis = self.axes[index]
            batch, length = tokens.shape[axis], tokens.shape[1 - axis]
            self.real[index] = real_tokens(extras, batch, length, self.conventions)
            if self.keep_calls:
                self.calls[index] = (args, dict(kwargs))
            if torch.is_grad_enabled() and not tokens.requires_grad:
                tokens = tokens.detach().requires_grad_(True)
                self.inputs[index] = tokens
                if args:
                    return (tokens, *args[1:]), kwargs
                return args, {**kwargs, key: tokens}
            self.inputs[index] = tokens
            return None

        return hook

    def batch_first(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """``tensors[d]`` (block d's tokens or their gradients) as ``[B, N, p]``."""
        return [x.transpose(0, 1) if a else x for x, a in zip(tensors, self.axes, strict=True)]

    def captured(self) -> list[Tensor]:
        missing = [d for d, x in enumerate(self.inputs) if x is None]
        if missing:
            raise RuntimeError(f"blocks {missing} did not run since the taps were cleared")
        return list(self.inputs)  # type: ignore[arg-type]

    def clear(self) -> None:
        self.inputs = [None] * len(self.blocks)
        self.real = [None] * len(self.blocks)
        self.calls = [None] * len(self.blocks)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    def __enter__(self) -> TokenTaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _expanded(blocks: Sequence[nn.Module]) -> bool:
    return any(hasattr(b, "dtme_modulation") or hasattr(b, "dtme_tokens") for b in blocks)


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
