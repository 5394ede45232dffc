"""A validation forward: replay each block's recorded call as DTME task streams before paying for
the analysis, so that an unsupported block layout fails at once, saying what is unsupported.

For every block, on the arguments of a real training forward (DTME-MTL, Jeong & Yoon 2025,
Secs. 3.3-3.4): (1) two identity-modulated streams must each reproduce the block's own output (the
extras were repeated per stream correctly); (2) with task tokens appended, the block must run, keep
its token count, and the tokens must change some real token's output, i.e. be attended
(Proposition 2's premise). Blocks run in eval mode on detached inputs, with the random number
generators forked: training state is not touched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .expansion import TOKEN_NAMES, StreamHooks, TaskTokens, block_layout
from .extras import UnsupportedExtra
from .streams import STREAMS
from .taps import batch_axis


def validate_blocks(
    blocks: Sequence[nn.Module],
    calls: Sequence[tuple[tuple, dict] | None],
    task_tokens: bool,
    conventions: Mapping[str, bool] | None = None,
) -> None:
    """Raise ``ValueError`` naming the block and the reason if some block cannot run as streams."""
    for d, (block, call) in enumerate(zip(blocks, calls, strict=True)):
        if call is None:
            raise ValueError(f"block {d} did not run in the forward pass DTME validated")
        with _quiet(block):
            _validate_block(d, block, call, task_tokens, dict(conventions or {}))


def _validate_block(
    d: int, block: nn.Module, call: tuple[tuple, dict], task_tokens: bool, conventions: dict
) -> None:
    args, kwargs = _detached(call)
    name = f"block {d} ({type(block).__name__})"
    axis = batch_axis(block)
    baseline = _batch_first(_tokens_of(block.forward(*args, **kwargs), name), axis)
    tokens = None
    for with_tokens in (False, True) if task_tokens else (False,):
        if with_tokens:
            width = (
                args[0] if args else kwargs[next(n for n in TOKEN_NAMES if n in kwargs)]
            ).shape[-1]
            dtype, device = block_layout(block, width)
            g = torch.Generator().manual_seed(0)
            tokens = TaskTokens(2, 2, width, std=1.0, generator=g, dtype=dtype, device=device)
        hooks = StreamHooks(2, True, None, tokens, conventions, axis)
        what = "with task tokens" if with_tokens else "as K task streams"
        try:
            a2, k2 = hooks.before(block, args, kwargs)
            output = hooks.after(block, a2, k2, block.forward(*a2, **k2))
        except UnsupportedExtra as error:
            raise ValueError(f"{name} cannot run {what}: {error}") from error
        except Exception as error:
            advice = (
                "use expansion=False (token modulation only), or pass blocks= without this layer"
                if with_tokens
                else "pass blocks= that take [B, N, p] tokens and per-sample extras"
            )
            raise ValueError(
                f"{name} cannot run {what}: {type(error).__name__}: {error}; {advice}"
            ) from error
        out = _batch_first(_tokens_of(output, name), axis)
        batch = baseline.shape[0]
        if tuple(out.shape) != (2 * batch, *baseline.shape[1:]):
            raise ValueError(
                f"{name} {what} returned {tuple(out.shape)}; expected {(2 * batch, *baseline.shape[1:])}"
            )
        if not with_tokens:
            atol = 1e-4 if baseline.dtype in (torch.float32, torch.float64) else 3e-2
            for i in range(2):
                stream = out[i * batch : (i + 1) * batch].float()
                if not torch.allclose(stream, baseline.float(), rtol=10 * atol, atol=atol):
                    raise ValueError(
                        f"{name}: stream {i} of two identical streams differs from the block's own "
                        "output, so some extra input was not repeated per stream correctly; pass "
                        "per-sample extras with a leading batch axis, and per-position ones without"
                    )
        elif torch.equal(out[:batch], baseline) and torch.equal(out[batch:], baseline):
            raise ValueError(
                f"{name}: appended task tokens change no token's output, so the block's attention "
                "mask masks them out (a mask whose convention DTME read the wrong way, or causal "
                "attention without an explicit mask); pass mask_conventions={name: "
                "'true_attends' | 'true_masks'} for the mask, or use expansion=False"
            )


def _batch_first(x: Tensor, axis: int) -> Tensor:
    return x.transpose(0, 1) if axis else x


def _detached(call: tuple[tuple, dict]) -> tuple[tuple, dict]:
    args, kwargs = call
    if args:
        return (args[0].detach(), *args[1:]), dict(kwargs)
    key = next(n for n in TOKEN_NAMES if n in kwargs)
    return (), {**kwargs, key: kwargs[key].detach()}


def _tokens_of(output: Any, name: str) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise ValueError(
        f"{name} returned {type(output).__name__}; DTME needs tokens (or a tuple of them)"
    )


@contextmanager
def _quiet(block: nn.Module):
    """Eval mode, forked RNGs, the stream context saved: the validation leaves no trace."""
    modes = [(m, m.training) for m in block.modules()]
    saved = (STREAMS.num_tasks, STREAMS.batch, STREAMS.branched, STREAMS.views, STREAMS.only)
    devices = [p.device for p in block.parameters() if p.device.type == "cuda"][:1]
    block.eval()
    STREAMS.only = None
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        for module, mode in modes:
            module.training = mode
        (STREAMS.num_tasks, STREAMS.batch, STREAMS.branched, STREAMS.views, STREAMS.only) = saved
