"""FAMO: fast adaptive multitask optimization."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from ..registry import register
from ._adam import AdamState, adam_step
from ._state import TaskAxes
from .base import LossStrategy, Scalarized


@register(
    "famo",
    kind="loss",
    cost="1 backward",
    stateful=True,
    paper="Liu et al., FAMO: Fast Adaptive Multitask Optimization, NeurIPS 2023",
    conventions="logit lr 0.025 and weight decay gamma=1e-3 (paper; the authors' code also uses "
    "0.01 and 1e-5); min_losses 0; no built-in gradient clipping (the authors' code clips the "
    "shared gradient norm to 1: clip between backward() and step() to match)",
)
class FAMO(LossStrategy):
    """FAMO (Liu et al., 2023, Algorithm 1).

    Minimises ``c · Σ_i z_i log(L_i − b_i + ε)`` with ``z = softmax(ξ)`` and the detached
    normaliser ``c = (Σ_i z_i / (L_i − b_i + ε))^{-1}``, so the shared gradient is
    ``Σ_i (c z_i / (L_i − b_i)) ∇L_i``. After the optimizer step the losses of the same batch are
    re-evaluated: with ``δ_i = log(L_i^old − b_i) − log(L_i^new − b_i)`` the logits take an Adam
    step along ``(∂z/∂ξ)ᵀ δ`` plus weight decay ``γ ξ`` (Eq. 7), so tasks that improved less gain
    weight. With :class:`~mtlopt.MTLOptimizer`, pass a closure to ``step`` (it is re-evaluated under
    ``torch.no_grad`` after the step) or call ``opt.update(losses)`` yourself; without either the
    logits never move (the optimizer warns).

    Absent tasks: ``z`` is the softmax of the present tasks' logits; an absent task's logit, Adam
    moments and previous loss are not advanced.

    Args:
        lr: learning rate of the logits (default 0.025).
        gamma: weight decay of the logits (default 1e-3).
        min_losses: lower bounds ``b_i`` of the losses (default 0).
        eps: ``ε`` inside the logarithms (default 1e-8).
    """

    absent_tasks = (
        "z = softmax of the present tasks' logits; an absent task's logit, Adam moments "
        "and previous loss are not advanced"
    )

    linear_in_losses = False

    needs_losses_after_step = True
    _state_attrs = ("logits", "_adam", "_previous")
    _task_state: ClassVar[dict[str, TaskAxes]] = {
        "logits": TaskAxes((0,), 0.0),
        "_adam": TaskAxes((0,), 0.0),
        "_previous": TaskAxes((0,), np.nan),
    }

    def __init__(
        self,
        lr: float = 0.025,
        gamma: float = 1e-3,
        min_losses: float | list[float] = 0.0,
        eps: float = 1e-8,
        num_tasks: int | None = None,
    ):
        super().__init__(num_tasks)
        self.lr, self.gamma, self.eps = lr, gamma, eps
        self.min_losses = min_losses
        self.logits: np.ndarray | None = None
        self._adam: AdamState | None = None
        self._previous: np.ndarray | None = None

    def hyperparameters(self) -> dict[str, object]:
        return {"lr": self.lr, "gamma": self.gamma, "min_losses": self.min_losses}

    def _gaps(self, losses: np.ndarray) -> np.ndarray:
        gaps = losses - np.asarray(self.present_entries(self.min_losses), dtype=np.float64)
        gaps = gaps + self.eps
        if np.any(gaps <= 0):
            raise ValueError(
                f"famo needs losses above min_losses (got losses {losses}); set min_losses lower"
            )
        return gaps

    def scalarize(self, losses: Tensor) -> Scalarized:
        t = losses.shape[0]
        logits = np.zeros(t) if self.logits is None else self.logits
        z = np.exp(logits - logits.max())
        z /= z.sum()
        observed = losses.detach().double().cpu().numpy()
        gaps = self._gaps(observed)
        c = 1.0 / float(np.sum(z / gaps))
        bounds = torch.as_tensor(
            np.asarray(self.present_entries(self.min_losses), dtype=np.float64)
        ).to(losses)
        z_t = torch.from_numpy(z).to(losses)
        loss = c * (z_t * torch.log(losses - bounds + self.eps)).sum()
        weights = torch.from_numpy(c * z / gaps).to(losses)

        def commit() -> None:
            self.logits = logits
            self._previous = observed

        return Scalarized(loss=loss, weights=weights, commit=commit)

    def update(self, losses_after_step: Tensor) -> None:
        if self._previous is None or self.logits is None:
            raise RuntimeError("famo.update() needs a step first")
        new = losses_after_step.detach().double().cpu().numpy().reshape(-1)
        if new.shape != self._previous.shape:
            raise ValueError(
                f"famo.update() got {new.size} losses for a step with {self._previous.size} tasks: "
                "pass the losses of the tasks of the last step, re-evaluated on the same batch"
            )
        if not np.all(np.isfinite(new)):
            raise FloatingPointError(
                f"famo.update() got non-finite losses {new}; nothing was changed"
            )
        delta = np.log(self._gaps(self._previous)) - np.log(self._gaps(new))
        z = np.exp(self.logits - self.logits.max())
        z /= z.sum()
        grad = z * (delta - z @ delta)  # (∂softmax/∂ξ)ᵀ δ
        adam = AdamState.zeros(z.size) if self._adam is None else self._adam
        self.logits, self._adam = adam_step(self.logits, grad, adam, self.lr, self.gamma)

    @property
    def task_weights(self) -> torch.Tensor | None:
        if self.logits is None:
            return None
        z = np.exp(self.logits - self.logits.max())
        return torch.from_numpy(z / z.sum())
