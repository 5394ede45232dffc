"""Shared lists of strategies and a random-Jacobian generator for the property tests."""

from __future__ import annotations

import torch

import mtlopt

RANDOM = {"pcgrad", "gradvac", "graddrop", "rlw"}

# i18c: strategies that need more than their name (a model, layers, a representation, a
# validation closure); tests/test_structural.py checks that each refuses clearly without it.
NEEDS_MORE_THAN_A_NAME = {
    "dtme", "auto_lambda", "moml", "forum", "rep_mtl", "recon", "ntkmtl_sr", "consmtl"
}


def by_name_only() -> list[str]:
    """The registered strategies that train given their name alone."""
    return [n for n in mtlopt.available() if n not in NEEDS_MORE_THAN_A_NAME]


def make(name: str, num_tasks: int | None = None, **kwargs) -> mtlopt.Strategy:
    """The strategy with a fixed seed where it draws random numbers."""
    if name in RANDOM:
        kwargs.setdefault("seed", 0)
    return mtlopt.create(name, num_tasks=num_tasks, **kwargs)


def aggregate(name: str, jacobian: torch.Tensor, losses=None, **kwargs) -> torch.Tensor:
    """``aggregate`` with unit losses for the strategies that read them (GradNorm, DB-MTL)."""
    strategy = make(name, jacobian.shape[0], **kwargs)
    if losses is None:
        losses = torch.ones(jacobian.shape[0], dtype=torch.float64)
    return strategy.aggregate(jacobian, losses)


def gradient_strategies() -> list[str]:
    """Gradient strategies that ``aggregate`` a plain J (those needing a hook are driven through
    the optimizer instead: :func:`drive`)."""
    return [
        n
        for n in mtlopt.available()
        if (mtlopt.info(n).kind.value == "gradient" or n == "ew") and not hooked(n)
    ]


# Strategies that need a hook (mtlopt.hooks, issue 18b) -------------------------------------------
def hooked(name: str) -> bool:
    """Whether the strategy needs more than ``step(losses)`` (a closure, other batches, a signal)."""
    return bool(mtlopt.info(name).hooks)


def plain(names: list[str]) -> list[str]:
    """The names that suites stepping with ``step(losses)`` or ``backward`` can run."""
    return [n for n in names if not hooked(n)]


def drive(opt: mtlopt.MTLOptimizer, closure):
    """``opt.step(closure)`` for every strategy: a strategy that reads a validation signal gets the
    current closure's losses (under ``torch.no_grad``, before every step) as its validation losses
    and scores. Multi-batch strategies call the closure once per draw; a closure over one fixed
    batch gives the same draw each time, which the generic suites accept."""
    reads = set(getattr(opt._combiner, "signals", ()))
    opt._driven = closure  # the signal is re-read from the current step's closure
    if reads and not opt._signal_sources:

        def values():
            out = opt._driven()
            if isinstance(out, dict):
                return {k: float(v) for k, v in out.items()}
            return [float(v) for v in out]

        opt.observe(**dict.fromkeys(reads, values))
    return opt.step(closure)


def random_jacobian(
    tasks: int, dim: int, seed: int, scale: float = 1.0, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tasks, dim, generator=g, dtype=torch.float64) * scale).to(dtype)


# Issue 18 drop-ins (helper i18a). None draws random numbers; every generic suite reaches them
# through mtlopt.available() / gradient_strategies().
FIELD_DROPINS_18A = (
    "constant",
    "cosmos",
    "cr_mogm",
    "excess_mtl",
    "go4align",
    "igb",
    "krum",
    "ldc_mtl",
    "moco",
    "ntkmtl",
    "pbi",
    "pcd",
    "trimmed_mean",
)
