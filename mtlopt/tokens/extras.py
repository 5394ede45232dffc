"""A block's extra inputs (attention masks, position extras) under K task streams and task tokens.

DTME-MTL (Jeong & Yoon, ICCV 2025), Sec. 3.4: stream i of an expanded block sees ``[T_in, T_i]``,
its input tokens followed by its task tokens, and Proposition 2 needs every real token to attend to
``T_i``. Every extra input a block receives must therefore follow the K streams stacked on the batch
axis and, where it has a token axis, grow by the task tokens with a value that lets them be
attended. This module decides, per argument name, what that value is:

- masks (names containing ``mask`` or ``padding``), whatever their shape (``[B, N]``, ``[N, N]``,
  ``[B·H, N, N]``, ``[B, 1, 1, N]``, ``[B, 1, N, N]``): padded with "attend". Additive float masks
  attend with 0; integer masks and float 0/1 masks whose name is not torch's (the Hugging Face
  ``attention_mask`` convention) with 1; boolean masks with ``True`` where ``True`` means attend
  (``attention_mask``: Hugging Face and SDPA) and ``False`` where it means masked (torch's
  ``src_mask``, ``key_padding_mask``, ``attn_mask``, ``padding``, ...; see :data:`TRUE_MASKS`);
- position biases (names containing ``bias``): padded with 0;
- rotary position embeddings (a ``(cos, sin)`` pair): the task tokens get the identity rotation
  (cos 1, sin 0): they have no position;
- ``position_ids``: padded with 0;
- any other tensor with a token axis: refused (:class:`UnsupportedExtra`), as its extension cannot
  be guessed.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

TRUE_ATTENDS = frozenset({"attention_mask", "encoder_attention_mask", "sliding_window_mask"})
"""Boolean masks where ``True`` means "may attend" (Hugging Face, SDPA)."""
TRUE_MASKS = frozenset(
    {
        "src_mask",
        "src_key_padding_mask",
        "key_padding_mask",
        "attn_mask",
        "mask",
        "padding",
        "padding_mask",
        "is_causal_mask",
    }
)
"""Boolean masks where ``True`` means "masked out" (torch's nn.MultiheadAttention convention)."""


class UnsupportedExtra(ValueError):
    """A block input that DTME cannot carry over to the task streams or extend for task tokens."""


def argument_names(module: nn.Module, args: tuple) -> list[str]:
    """Names of ``module.forward``'s positional arguments (``arg{i}`` past the named ones)."""
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        parameters = []
    positional = [
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    return [positional[i] if i < len(positional) else f"arg{i}" for i in range(len(args))]


def named_extras(module: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Every input of a block call but the tokens, by argument name."""
    names = argument_names(module, args)
    extras = dict(zip(names[1:], args[1:], strict=True))
    extras.update({k: v for k, v in kwargs.items() if k not in ("src", "x", "hidden_states")})
    return extras


def true_attends(name: str, conventions: Mapping[str, bool]) -> bool:
    """Whether ``True`` in the boolean mask ``name`` means "attend"."""
    if name in conventions:
        return conventions[name]
    if name in TRUE_ATTENDS:
        return True
    if name in TRUE_MASKS or "padding" in name:
        return False
    raise UnsupportedExtra(
        f"boolean mask {name!r}: DTME cannot tell whether True means 'attend' or 'masked'; say "
        f"which: create('dtme', ..., mask_conventions={{{name!r}: 'true_attends'}}) or "
        "'true_masks'"
    )


def _is_mask(name: str) -> bool:
    return ("mask" in name or "padding" in name) and name != "head_mask"


def _is_square(name: str, value: Tensor, length: int) -> bool:
    """A per-position ``[N, N]`` mask (torch's ``src_mask``), not a per-sample ``[B, N]`` one."""
    return (
        value.dim() == 2
        and tuple(value.shape) == (length, length)
        and "padding" not in name
        and name not in TRUE_ATTENDS
    )


def attend_value(name: str, value: Tensor, conventions: Mapping[str, bool]) -> float | bool:
    """The entry of mask (or bias) ``name`` that lets a query attend to a key."""
    if value.dtype == torch.bool:
        return true_attends(name, conventions)
    if not value.is_floating_point():
        return 1
    if "bias" in name:
        return 0.0
    if name in TRUE_ATTENDS and value.dim() == 2 and _zero_one(value):
        return 1.0  # a Hugging Face [B, N] attention_mask in float: 1 = attend
    return 0.0  # additive: 0 = attend, a large negative number or -inf = masked


def _zero_one(value: Tensor) -> bool:
    return bool(((value == 0) | (value == 1)).all()) and bool((value == 1).any())


def adapt(
    name: str,
    value: Any,
    num_tasks: int,
    batch: int,
    length: int,
    extra: int,
    conventions: Mapping[str, bool],
) -> Any:
    """``value`` for the ``num_tasks`` streams of a ``batch`` of ``length`` tokens, each followed by
    ``extra`` task tokens."""
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, Tensor) and v.dim() >= 2 and v.shape[-2] == length for v in value)
    ):
        cos, sin = (_repeat(v, num_tasks, batch) for v in value)
        if extra:
            cos = _pad(cos, cos.dim() - 2, extra, 1.0)
            sin = _pad(sin, sin.dim() - 2, extra, 0.0)
        return type(value)((cos, sin))
    if not isinstance(value, Tensor):
        return value
    if value.is_nested:
        raise UnsupportedExtra(f"{name!r} is a nested tensor; DTME needs padded tensors")
    square = _is_square(name, value, length)
    if not square:
        value = _repeat(value, num_tasks, batch)
    if not extra:
        return value
    token_axes = [a for a in range(0 if square else 1, value.dim()) if value.shape[a] == length]
    if not token_axes:
        return value
    if _is_mask(name) or "bias" in name:
        fill = attend_value(name, value, conventions)
        for axis in token_axes:
            value = _pad(value, axis, extra, fill)
        return value
    if name == "position_ids":
        return _pad(value, value.dim() - 1, extra, 0)
    raise UnsupportedExtra(
        f"block input {name!r} of shape {tuple(value.shape)} has a token axis (size {length}) and "
        "DTME cannot tell how to extend it for the task tokens (it extends masks, position biases, "
        "rotary (cos, sin) pairs and position_ids); use expansion=False (token modulation only)"
    )


def _repeat(value: Tensor, num_tasks: int, batch: int) -> Tensor:
    """Per-sample tensors (leading axis a multiple of B, e.g. ``[B, N]`` or torch's ``[B·H, N, N]``)
    repeated task-major for the streams; shared ones (leading axis 1) unchanged."""
    if num_tasks > 1 and value.dim() >= 1 and batch > 0 and value.shape[0] % batch == 0:
        if value.shape[0] > 1 or batch == 1:
            return value.repeat(num_tasks, *([1] * (value.dim() - 1)))
    return value


def _pad(value: Tensor, axis: int, extra: int, fill: float | bool) -> Tensor:
    shape = list(value.shape)
    shape[axis] = extra
    return torch.cat([value, value.new_full(shape, fill)], dim=axis)


def real_tokens(
    extras: Mapping[str, Any], batch: int, length: int, conventions: Mapping[str, bool]
) -> Tensor | None:
    """``[B, N]`` booleans: the tokens some query may attend to, read from the block's masks (the
    padding is the rest); ``None`` where no per-sample mask says."""
    real: Tensor | None = None
    for name, value in extras.items():
        if not (_is_mask(name) and isinstance(value, Tensor)) or value.is_nested:
            continue
        if value.dim() < 2 or value.shape[0] != batch or value.shape[-1] != length:
            continue
        if _is_square(name, value, length) and batch == length and value.dim() == 2:
            continue
        attend = _attends(name, value, conventions)
        if attend is None:
            continue
        keys = attend.reshape(batch, -1, length).any(dim=1)
        real = keys if real is None else real & keys
    return real


def _attends(name: str, value: Tensor, conventions: Mapping[str, bool]) -> Tensor | None:
    if value.dtype == torch.bool:
        return value if true_attends(name, conventions) else ~value
    if not value.is_floating_point():
        return value != 0
    if name in TRUE_ATTENDS and value.dim() == 2 and _zero_one(value):
        return value != 0
    masked = value <= -1e4  # additive masks hold 0 and a large negative number (or -inf)
    if not bool((masked | (value == 0)).all()):
        return None  # not a mask: a bias
    return ~masked
