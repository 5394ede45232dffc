"""Strategies, one module each; importing this package registers them all."""

from . import (  # noqa: F401  (importing registers each strategy)
    aligned_mtl,
    auto_lambda,
    cagrad,
    config,
    db_mtl,
    dwa,
    ew,
    fairgrad,
    famo,
    gls,
    graddrop,
    gradnorm,
    gradvac,
    imtl,
    mgda,
    nash_mtl,
    pcgrad,
    rep_mtl,
    rlw,
    sparse_mtl,
    stch,
    upgrad,
    uw,
)
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
]
