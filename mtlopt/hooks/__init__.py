"""Hooks for strategies that need more than the step's task losses (issue 18, hooks 1-3).

* :mod:`~mtlopt.hooks.batches` — **multi-batch closure** (MoDo, SDMGrad): ``step(closure)`` calls
  the closure once per independent batch, or ``step([losses_1, losses_2, losses_3])``.
* :mod:`~mtlopt.hooks.perturb` — **perturb and re-evaluate** (F-MTL, SAMO): per-task
  sharpness-aware perturbations of the parameters, the closure re-evaluated there with the
  normalisation layers' running statistics frozen, everything restored bit for bit.
* :mod:`~mtlopt.hooks.signal` — **validation signal** (CoBa, PIVRG): ``opt.observe(...)`` feeds
  validation losses or per-task scores into the strategy's (saved) state.

:func:`prepare` is what :meth:`MTLOptimizer.step <mtlopt.MTLOptimizer.step>` runs before the
backward, :func:`ready` what every backward checks first, :func:`feeding` what hands a strategy
its extra inputs for the duration of one backward.
"""

from .batches import MultiBatch
from .dispatch import feeding, prepare, ready
from .feed import Fed
from .perturb import Perturbed, frozen_running_stats
from .signal import Observing, observe

__all__ = [
    "Fed",
    "MultiBatch",
    "Observing",
    "Perturbed",
    "feeding",
    "frozen_running_stats",
    "observe",
    "prepare",
    "ready",
]
