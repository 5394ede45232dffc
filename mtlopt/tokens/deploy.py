"""Loading a trained DTME model without the training machinery.

The expansion (DTME-MTL, Jeong & Yoon 2025, Secs. 3.3–3.4) leaves its modules in the model's own
``state_dict`` under ``<block>.dtme_modulation.*`` and ``<block>.dtme_tokens.*``; their names and
shapes say the whole plan (which blocks, K, the tokens per task, each block's width), so a fresh
model can be expanded from the saved weights alone.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from .expansion import Expansion, ExpansionPlan, expand
from .taps import find_blocks

_KEY = re.compile(r"^(?:(.*)\.)?dtme_(modulation\.weight|tokens\.tokens)\.(\d+)$")


def plan_from_state_dict(
    model: nn.Module, state_dict: Mapping[str, Tensor], blocks: Sequence[nn.Module] | None = None
) -> tuple[ExpansionPlan, list[int]]:
    """The expansion plan and the per-block widths that ``state_dict`` was saved under."""
    blocks = find_blocks(model if blocks is None else blocks)
    names = {id(m): name for name, m in model.named_modules()}
    index = {names.get(id(b)): d for d, b in enumerate(blocks)}
    modulation: dict[int, int] = {}
    tokens: dict[int, int] = {}
    dims = [0] * len(blocks)
    count = 0
    for key, value in state_dict.items():
        found = _KEY.match(key)
        if not found:
            continue
        prefix, kind, task = found.group(1) or "", found.group(2), int(found.group(3))
        if prefix not in index:
            raise ValueError(f"{key!r}: {prefix!r} is not one of the model's blocks")
        d = index[prefix]
        dims[d] = int(value.shape[-1])
        target = modulation if kind.startswith("modulation") else tokens
        target[d] = max(target.get(d, 0), task + 1)
        if kind.startswith("tokens"):
            count = int(value.shape[0])
    ks = set(modulation.values()) | set(tokens.values())
    if not ks:
        raise ValueError("the state dict holds no DTME modules (no '*.dtme_*' keys)")
    if len(ks) != 1:
        raise ValueError(f"inconsistent task counts in the state dict: {sorted(ks)}")
    gated = any(".dtme_gate." in f".{key}" for key in state_dict)
    plan = ExpansionPlan(ks.pop(), sorted(modulation), sorted(tokens), count, gated=gated)
    return plan, [d or 1 for d in dims]


def load_expanded(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    blocks: Sequence[nn.Module] | None = None,
    strict: bool = True,
) -> Expansion:
    """Expand a fresh ``model`` by the plan its saved ``state_dict`` was trained with, then load
    the weights: a trained DTME model for inference, without an optimizer or a DTME strategy.
    Heads read their stream with ``task_view`` as in training; ``single_task(i)`` runs one task."""
    chosen = find_blocks(model if blocks is None else blocks)
    plan, dims = plan_from_state_dict(model, state_dict, chosen)
    expansion = expand(chosen, plan, dims)
    try:
        model.load_state_dict(state_dict, strict=strict)
    except RuntimeError:
        expansion.remove()
        for block in chosen:
            for name in ("dtme_modulation", "dtme_tokens", "dtme_gate"):
                if hasattr(block, name):
                    delattr(block, name)
        raise
    return expansion
