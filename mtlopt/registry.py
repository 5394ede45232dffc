"""The strategy registry: `register`, `create`, `available`, and the metadata of each strategy."""

from __future__ import annotations

import difflib
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from .strategies.base import Strategy


class Kind(str, enum.Enum):
    """What a strategy acts on."""

    LOSS = "loss"
    """Turns the vector of task losses into one scalar objective (one backward pass)."""
    GRADIENT = "gradient"
    """Turns the T×P matrix of per-task shared gradients into one update direction."""
    TOKEN = "token"
    """Works on per-task gradients of a transformer's token activations (DTME-MTL)."""
    # i18c: structural methods (bilevel, regulariser, masks, Recon) ------------------------------
    STRUCTURAL = "structural"
    """Changes the training step's structure: a virtual step on a validation batch, a regulariser
    on feature gradients, a mask on the update, or the model's sharing (Auto-λ, Rep-MTL, sparse
    training, Recon)."""


class Cost(str, enum.Enum):
    """How many backward passes one training step costs."""

    ONE_BACKWARD = "1 backward"
    T_BACKWARD = "T backward"
    REPRESENTATION = "representation"
    TOKEN_STREAMS = "1 + T backward (analysis), then T streams after the branch"
    """DTME-MTL: T extra backward passes to the block inputs per analysis step; after the expansion
    one backward, with every block from the branch on running T streams."""
    # i18c ---------------------------------------------------------------------------------------
    VIRTUAL_STEP = "1 backward + virtual step (2 backward, 3 forward)"
    """Auto-λ: the step's backward, a virtual step, the validation gradient at the virtual point
    and two forward passes for the finite difference."""
    MULTI_OBJECTIVE_VIRTUAL_STEP = "2T + 1 backward (T at θ, T at a virtual step), 2 forward"
    """MOML: per-task training gradients at θ, one inner step, per-task upper gradients at the
    virtual point, then the step's backward."""
    INNER_STEPS = "T + K + 1 backward, K + 1 forward (K inner steps)"
    """FORUM: the lower objective's gradient, K inner SGD steps re-running the batch, the T upper
    gradients, then the step's backward."""
    DOUBLE_BACKWARD = "1 backward + T to the features, double backward"
    """Rep-MTL: per-task gradients of the shared features with a graph, then one backward of the
    regularised objective through them."""
    FEATURE_GRADIENTS = "1 backward + T to the features"
    """NTKMTL-SR: per-task gradients of the shared features (first order), then one backward of
    the weighted losses."""
    HEAD_DOUBLE_BACKWARD = "T backward + T to the features, double backward to the heads"
    """ConsMTL: per-task gradients of the shared parameters, per-task gradients of the shared
    features with a graph, then one double backward per task to its own parameters."""
    AS_BASE = "the base strategy's"
    """A transform of another strategy's update (sparse training): the base's cost."""
    BRANCHES = "T backward (analysis), then T streams after the branch"
    """Recon: per-task layer gradients during the analysis, then per-task copies of the chosen
    layers."""
    # Strategies that need a hook (mtlopt.hooks, issue 18b) ------------------------------------
    BATCHES = "2-3 batches × T backward"
    """MoDo, SDMGrad: per-task gradients of two or three independent batches per step."""
    PERTURBED = "2T backward + T forward"
    """F-MTL, SAMO: per-task gradients, then one perturbed forward and backward per task."""


@dataclass(frozen=True)
class StrategyInfo:
    """Metadata a strategy declares at registration; the docs' catalogue table is generated from it."""

    name: str
    kind: Kind
    cost: Cost
    stateful: bool
    paper: str
    conventions: str = ""
    hooks: tuple[str, ...] = ()
    """What the strategy needs beyond ``step(losses)`` (see :mod:`mtlopt.hooks`): ``"batches"``
    (a closure drawing a new batch per call), ``"closure"`` (a closure re-evaluated at perturbed
    parameters), ``"validation_losses"`` or ``"scores"`` (``opt.observe(...)``).
    Structural methods (i18c) name what they are created with: ``"model"`` and ``"validation"``
    (Auto-λ), ``"representation"`` (Rep-MTL), ``"layers"`` (Recon)."""

    def as_row(self) -> dict[str, str]:
        return {
            "name": self.name,
            "kind": self.kind.value,
            "cost": self.cost.value,
            "stateful": "yes" if self.stateful else "no",
            "paper": self.paper,
            "conventions": self.conventions,
            "hooks": ", ".join(self.hooks),
        }


_REGISTRY: dict[str, type[Strategy]] = {}

S = TypeVar("S", bound="type[Strategy]")


def register(
    name: str,
    *,
    kind: Kind | str,
    cost: Cost | str,
    stateful: bool,
    paper: str,
    conventions: str = "",
    hooks: tuple[str, ...] = (),
) -> Callable[[S], S]:
    """Class decorator that adds a strategy to the registry under a lower-case ``name``."""
    if name != name.lower() or not name.replace("_", "").isalnum():
        raise ValueError(f"strategy names are lower-case identifiers, got {name!r}")

    def decorate(cls: S) -> S:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"a strategy named {name!r} is already registered ({_REGISTRY[name]})")
        cls.info = StrategyInfo(
            name, Kind(kind), Cost(cost), stateful, paper, conventions, tuple(hooks)
        )
        _REGISTRY[name] = cls
        return cls

    return decorate


def _lookup(name: str) -> type[Strategy]:
    key = name.lower().replace("-", "_")
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise KeyError(f"unknown strategy {name!r}.{hint} Available: {', '.join(available())}.")
    return _REGISTRY[key]


def create(name: str, **kwargs: Any) -> Strategy:
    """Instantiate the strategy registered as ``name`` with its hyperparameters.

    ``"torchjd:<Aggregator>"`` (e.g. ``"torchjd:UPGrad"``) wraps a torchjd aggregator instead (see
    :mod:`mtlopt.interop.torchjd`).

    A gradient strategy also takes ``group_by="param_group" | "module" | "tensor"`` (and
    ``modules=model`` for ``"module"``): it is then applied to each group of shared parameters on
    its own (:class:`~mtlopt.strategies.grouped.Grouped`)."""
    if name.lower().startswith("torchjd:"):
        from .interop.torchjd import from_torchjd

        return from_torchjd(name.split(":", 1)[1], **kwargs)
    cls = _lookup(name)
    group_by = kwargs.pop("group_by", None)
    modules = kwargs.pop("modules", None)
    implied = getattr(cls, "grouping", None)
    if group_by is None and implied is not None:
        group_by = implied(kwargs)
    if group_by is None:
        if modules is not None:
            raise TypeError("modules= is only used with group_by='module' or 'tensor'")
        return cls(**kwargs)
    from .strategies.base import GradientStrategy
    from .strategies.grouped import Grouped

    if not issubclass(cls, GradientStrategy):
        raise TypeError(
            f"group_by applies to gradient strategies; {name!r} is a {cls.info.kind.value} strategy"
        )
    num_tasks = kwargs.pop("num_tasks", None)
    return Grouped(cls(num_tasks=num_tasks, **kwargs), group_by, modules=modules, num_tasks=num_tasks)


def available() -> list[str]:
    """Names of all registered strategies, sorted."""
    return sorted(_REGISTRY)


def info(name: str) -> StrategyInfo:
    """Metadata of the strategy registered as ``name``."""
    return _lookup(name).info
