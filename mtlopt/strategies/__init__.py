"""Strategies, one module each; importing this package registers them all."""

from . import cagrad, ew, gradnorm, mgda, pcgrad
from .base import (
    Combined,
    GradientStrategy,
    GramianStrategy,
    LossStrategy,
    Scalarized,
    Strategy,
)

__all__ = [
    "Combined",
    "GradientStrategy",
    "GramianStrategy",
    "LossStrategy",
    "Scalarized",
    "Strategy",
    "cagrad",
    "ew",
    "gradnorm",
    "mgda",
    "pcgrad",
]
