"""Strategies, one module each; importing this package registers them all."""

from . import (  # noqa: F401  (importing registers each strategy)
    aligned_mtl,
    cagrad,
    coba,
    config,
    db_mtl,
    dwa,
    ew,
    fairgrad,
    famo,
    fmtl,
    gls,
    graddrop,
    gradnorm,
    gradvac,
    imtl,
    mgda,
    modo,
    nash_mtl,
    pcgrad,
    pivrg,
    rlw,
    samo,
    sdmgrad,
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
