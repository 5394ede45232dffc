"""mtlopt: multi-task optimization for PyTorch.

Wrap the optimizer you already have and pick a strategy by name::

    opt = mtlopt.MTLOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-4), strategy="pcgrad")
    opt.zero_grad(); opt.step(losses)
"""

from . import strategies as _strategies  # noqa: F401  (registers the built-in strategies)
from . import tokens
from .diagnose import Diagnosis, diagnose
from .multi import OptimizerChain
from .optimizer import MTLOptimizer, StepInfo
from .registry import Cost, Kind, StrategyInfo, available, create, info, register
from .strategies.base import (
    Combined,
    GradientStrategy,
    GramianStrategy,
    LossStrategy,
    Scalarized,
    Strategy,
    TokenStrategy,
)
from .tasks import masked_mean
from .tokens import task_view

__version__ = "0.1.0"

__all__ = [
    "Combined",
    "Cost",
    "Diagnosis",
    "GradientStrategy",
    "GramianStrategy",
    "Kind",
    "LossStrategy",
    "MTLOptimizer",
    "OptimizerChain",
    "Scalarized",
    "StepInfo",
    "Strategy",
    "StrategyInfo",
    "TokenStrategy",
    "available",
    "create",
    "diagnose",
    "info",
    "masked_mean",
    "register",
    "task_view",
    "tokens",
]
