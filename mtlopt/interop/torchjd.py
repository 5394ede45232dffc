"""torchjd ⇄ mtlopt: run a torchjd aggregator or weighting as an mtlopt strategy, or an mtlopt
strategy as a torchjd ``Aggregator``.

``from_torchjd("UPGrad")`` (or the name ``"torchjd:UPGrad"`` anywhere mtlopt takes a strategy
name: ``MTLOptimizer(opt, "torchjd:UPGrad")``) wraps ``torchjd.aggregation.UPGrad()`` so that
:class:`~mtlopt.MTLOptimizer` hands it our Jacobian of the shared parameters; a ``...Weighting``
name wraps a torchjd weighting, which receives the Gramian ``J Jᵀ`` and returns the task weights.

``to_torchjd("nash_mtl")`` returns a ``torchjd.aggregation.Aggregator`` that combines with the
mtlopt strategy, to be passed to ``torchjd.autojac.backward`` / ``mtl_backward``.

torchjd itself is optional: ``pip install torch==2.13.0 torchjd==0.18.0``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..registry import Cost, Kind, StrategyInfo, create
from ..strategies.base import Combined, GradientStrategy, LossStrategy, _as_matrix


def import_torchjd() -> Any:
    """``torchjd.aggregation``, or an error that says how to install it."""
    try:
        import torchjd.aggregation as aggregation
    except ImportError as error:
        raise ImportError(
            "torchjd is not installed: pip install torch==2.13.0 torchjd==0.18.0"
        ) from error
    return aggregation


def from_torchjd(name: str, num_tasks: int | None = None, **kwargs: Any) -> GradientStrategy:
    """A torchjd aggregator (``"UPGrad"``, ``"MGDA"``, ...) or weighting (``"UPGradWeighting"``) as
    an mtlopt gradient strategy; ``kwargs`` go to the torchjd constructor."""
    aggregation = import_torchjd()
    cls = getattr(aggregation, name, None)
    if not isinstance(cls, type) or not issubclass(
        cls, (aggregation.Aggregator, aggregation.Weighting)
    ):
        names = sorted(
            n
            for n in dir(aggregation)
            if isinstance(getattr(aggregation, n), type)
            and issubclass(getattr(aggregation, n), (aggregation.Aggregator, aggregation.Weighting))
            and not n.endswith("Aggregator")
            and n not in ("Aggregator", "Weighting")
        )
        raise KeyError(f"torchjd has no aggregator or weighting {name!r}; it has {', '.join(names)}")
    return TorchJDStrategy(name, cls(**kwargs), num_tasks)


class TorchJDStrategy(GradientStrategy):
    """A torchjd aggregator or weighting inside mtlopt.

    An aggregator maps ``J`` to the update itself; a weighting maps the Gramian to the weights
    ``w`` and the update is ``wᵀ J``. torchjd keeps any state (GradVac's targets, CR-MOGM's
    average) inside its own object: it advances at every combination (under gradient accumulation,
    once per micro-batch) and is not part of mtlopt's ``state_dict``.
    """

    supports_representation = True
    absent_tasks = "the present tasks' rows of J are given to torchjd"

    def __init__(self, name: str, method: Any, num_tasks: int | None = None) -> None:
        super().__init__(num_tasks)
        self.method = method
        self.is_weighting = not isinstance(method, import_torchjd().Aggregator)
        self.info = StrategyInfo(
            f"torchjd:{name}", Kind.GRADIENT, Cost.T_BACKWARD, True, "torchjd 0.18"
        )

    def hyperparameters(self) -> dict[str, object]:
        return {"torchjd": repr(self.method)}

    def combine(self, jacobian: Tensor, losses: Tensor | None = None) -> Combined:
        jacobian = _as_matrix(jacobian)
        if self.is_weighting:
            gramian = jacobian @ jacobian.T
            weights = self.method(gramian).to(jacobian)
            return Combined(direction=weights @ jacobian, weights=weights)
        direction = self.method(jacobian)
        return Combined(direction=direction.detach().to(jacobian), weights=None)


def to_torchjd(name: str, **kwargs: Any) -> Any:
    """The mtlopt gradient strategy ``name`` as a ``torchjd.aggregation.Aggregator`` (stateful
    strategies advance their state at every call, as torchjd's own stateful aggregators do)."""
    aggregation = import_torchjd()
    strategy = create(name, **kwargs)
    if isinstance(strategy, LossStrategy) and strategy.info.name != "ew":
        raise TypeError(f"{name} is a loss strategy: torchjd aggregators combine Jacobians")
    if not isinstance(strategy, (GradientStrategy, LossStrategy)):
        raise TypeError(f"{name} does not combine Jacobians")

    class MTLOptAggregator(aggregation.Aggregator):
        def __init__(self) -> None:
            super().__init__()
            self.strategy = strategy

        def forward(self, matrix: Tensor, /) -> Tensor:
            if self.strategy.num_tasks is None:
                self.strategy.build(matrix.shape[0])
            with torch.no_grad():
                return self.strategy.aggregate(matrix).to(matrix)

        def __repr__(self) -> str:
            return f"MTLOptAggregator({self.strategy!r})"

    MTLOptAggregator.__name__ = f"MTLOpt_{name}"
    return MTLOptAggregator()
