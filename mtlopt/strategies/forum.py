"""FORUM: a first-order multi-gradient method for multi-objective bilevel optimisation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from ..bilevel import (
    check_model,
    flatten,
    gradients_of,
    moved_to,
    present_losses,
    sgd_point,
    step_closure,
    trainable_parameters,
)
from ..registry import register
from ._adam import AdamState, adam_step
from ._state import TaskAxes
from .base import LossStrategy, Scalarized
from .coba import softmax


@register(
    "forum",
    kind="structural",
    hooks=("model", "validation", "closure"),
    cost="T + K + 1 backward, K + 1 forward (K inner steps)",
    stateful=True,
    paper="Ye, Lin, Cao, Zhang & Tsang, A First-Order Multi-Gradient Algorithm for "
    "Multi-Objective Bi-Level Optimization, ECAI 2024",
    conventions="official code (Baijiong-Lin/FORUM): weights softmax(α) from uniform, Adam on α "
    "(weight_lr=1e-3, LibMTL's outer_lr); inner_steps=5 SGD steps with inner_lr=0.1 on every "
    "trainable parameter (stopped when the inner loss passes 1e5); rho=0.1; upper gradients "
    "over (‖g‖ + 1e-8); the λ EMA at rate 1/(e + 1)^¾ counts epochs (steps_per_epoch=; None: "
    "every step is an epoch); the QP solved to rounding (SLSQP) where the code runs cvxpy",
)
class FORUM(LossStrategy):
    """FORUM (Ye, Lin, Cao, Zhang & Tsang, ECAI 2024, Alg. 1 as the official code runs it).

    The bilevel problem ``min_{α,ω} F(ω) s.t. ω ∈ argmin f(α, ω)``, ``f = softmax(α)ᵀ L^train``,
    is rewritten with the value function: ``q(α, ω) = f(α, ω) − f(α, ω_K) ≤ 0``, where ``ω_K``
    is ω after K inner SGD steps on f. With ``g_q = ∇q`` (its α part
    ``J_softmax (L^train(ω) − L^train(ω_K))``, its ω part ``∇_ω f``) and the unit upper gradients
    ``ĝ_t = ∇_ω F_t / (‖∇_ω F_t‖ + 1e-8)`` (zero α part), each step solves the QP::

        min_{w ≥ 0}  ‖Σ_t w_t ĝ_t + w_q g_q‖² − w_q ρ (‖g_q‖² + 1e-8)
        s.t.  Σ_t w_t = 1,   w_q ≥ Σ_t w_t π_t,   π_t = ρ − ⟨g_q, ĝ_t⟩ / (‖g_q‖² + 1e-8)

    keeps an EMA λ of its ``w_t``, sets ``ν = max(Σ_t λ_t π_t, 0)`` and updates along
    ``d = Σ_t λ_t ĝ_t + ν g_q``: Adam steps α by its α part, and the step trains on
    ``Σ_t λ_t F_t / (‖∇F_t‖ + 1e-8) + ν f(α, ω)``, whose gradient is its ω part (the
    coefficients are constants of the step).

    The upper losses F come from the ``validation`` closure (the official code draws a second
    training batch there), f from the step's batch, re-run through the step's closure at each
    inner point. The parameters are moved to the inner points by swapping their storage and
    restored after, buffers included; the official code deep-copies the model.

    Usage::

        opt = mtlopt.MTLOptimizer(torch.optim.Adam(model.parameters(), lr=1e-4), "forum",
                                  model=model, steps_per_epoch=len(loader),
                                  validation=lambda: task_losses(model, next(val_batches)))
        opt.step(lambda: task_losses(model, batch))   # a closure: the batch is re-run

    Args:
        model: the model whose trainable parameters take the inner steps (heads included).
        validation: a closure returning the upper losses of a fresh batch (a dict by task name
            or a list in task order), called once per step at the current parameters.
        inner_lr: the inner SGD steps' learning rate (the official ``eta``, 0.1).
        inner_steps: the number of inner steps K (5).
        rho: ρ of the progress constraint (0.1).
        weight_lr: Adam's learning rate on α (1e-3).
        steps_per_epoch: steps per epoch for the λ EMA's rate ``1/(e + 1)^¾`` (the official code
            counts epochs e); ``None`` counts every step as an epoch.
    """

    absent_tasks = (
        "the QP, λ and softmax(α) run over the present tasks; an absent task's α, Adam state and "
        "λ wait; both closures must give every present task a loss"
    )

    _state_attrs = ("logits", "_adam", "ema", "steps")
    _task_state: ClassVar[dict[str, TaskAxes]] = {
        "logits": TaskAxes((0,), 0.0),
        "_adam": TaskAxes((0,), 0.0),
        "ema": TaskAxes((0,), 0.0),
    }

    def __init__(
        self,
        model: nn.Module | None = None,
        validation: Callable[[], Any] | None = None,
        inner_lr: float = 0.1,
        inner_steps: int = 5,
        rho: float = 0.1,
        weight_lr: float = 1e-3,
        steps_per_epoch: int | None = None,
        num_tasks: int | None = None,
    ) -> None:
        super().__init__(num_tasks)
        if not inner_lr > 0 or not weight_lr > 0 or not rho >= 0:
            raise ValueError("inner_lr and weight_lr must be positive and rho non-negative")
        if int(inner_steps) != inner_steps or inner_steps < 1:
            raise ValueError(f"inner_steps must be a positive integer, got {inner_steps}")
        if steps_per_epoch is not None and (int(steps_per_epoch) != steps_per_epoch
                                            or steps_per_epoch < 1):
            raise ValueError(f"steps_per_epoch must be a positive integer, got {steps_per_epoch}")
        check_model(model)
        self.model, self.validation = model, validation
        self.inner_lr, self.inner_steps, self.rho = float(inner_lr), int(inner_steps), float(rho)
        self.weight_lr, self.steps_per_epoch = float(weight_lr), steps_per_epoch
        self.logits: np.ndarray | None = None
        self._adam: AdamState | None = None
        self.ema: np.ndarray | None = None
        self.steps = 0

    def hyperparameters(self) -> dict[str, object]:
        return {
            "inner_lr": self.inner_lr,
            "inner_steps": self.inner_steps,
            "rho": self.rho,
            "weight_lr": self.weight_lr,
            "steps_per_epoch": self.steps_per_epoch,
        }

    def _build(self) -> None:
        assert self.num_tasks is not None
        if self.logits is None:
            self.logits = np.zeros(self.num_tasks)
            self._adam = AdamState.zeros(self.num_tasks)
            self.ema = np.zeros(self.num_tasks)

    def scalarize(self, losses: Tensor) -> Scalarized:
        missing = [n for n in ("model", "validation") if getattr(self, n) is None]
        if missing:
            raise TypeError(
                f"forum needs {' and '.join(missing)}: MTLOptimizer(opt, 'forum', model=model, "
                "validation=lambda: val_losses(next(val_batches))), stepped with a closure; "
                "nothing was changed"
            )
        if step_closure() is None:
            raise TypeError(
                "forum re-runs the training batch at its inner points: step with a closure, "
                "opt.step(lambda: task_losses(model, batch)); nothing was changed"
            )
        if self.logits is None:
            self.num_tasks = self.num_tasks or losses.shape[0]
            self._build()
        assert self.logits is not None and self._adam is not None and self.ema is not None
        direction = self.direction(losses, self.logits, self.ema, self.steps)
        logits, adam = adam_step(self.logits, direction.alpha, self._adam, self.weight_lr)
        weights = torch.as_tensor(softmax(self.logits), dtype=losses.dtype, device=losses.device)
        upper = torch.as_tensor(direction.upper, dtype=losses.dtype, device=losses.device)
        objective = upper @ direction.upper_losses + direction.nu * (weights @ losses)

        def commit() -> None:
            self.logits, self._adam, self.ema = logits, adam, direction.ema
            self.steps += 1

        return Scalarized(loss=objective, weights=(direction.nu * weights).detach(), commit=commit)

    def direction(
        self, losses: Tensor, logits: np.ndarray, ema: np.ndarray, step: int
    ) -> _Direction:
        """The step's QP, EMA and update coefficients for the present tasks."""
        assert self.model is not None and self.validation is not None
        params = trainable_parameters(self.model)
        present = range(len(losses)) if self._present is None else self._present
        weights = softmax(logits)
        w = torch.as_tensor(weights, dtype=losses.dtype, device=losses.device)
        lower = flatten(gradients_of(w @ losses, params, retain_graph=True))  # ∇_ω f at ω
        values = losses.detach().double().cpu().numpy()
        inner_values = self._inner_losses(params, weights, lower, values, present)
        jacobian = np.diag(weights) - np.outer(weights, weights)  # of softmax, symmetric
        q_alpha = jacobian @ (values - inner_values)
        with torch.enable_grad():
            upper_losses = torch.stack(
                present_losses(self.validation(), present, self.task_names, "forum")
            )
        upper = torch.stack([
            flatten(gradients_of(loss, params, retain_graph=True)) for loss in upper_losses
        ]).double()
        norms = upper.norm(dim=1) + 1e-8
        unit = upper / norms[:, None]
        q_omega = lower.double()
        q_squared = float(q_omega @ q_omega) + float(q_alpha @ q_alpha)
        unit_dot_q = (unit @ q_omega).cpu().numpy()
        pi = self.rho - unit_dot_q / (q_squared + 1e-8)
        gram = np.empty((len(pi) + 1, len(pi) + 1))
        gram[:-1, :-1] = (unit @ unit.T).cpu().numpy()
        gram[:-1, -1] = gram[-1, :-1] = unit_dot_q
        gram[-1, -1] = q_squared
        solution = progress_qp(gram, pi, self.rho * (q_squared + 1e-8))
        epoch = step if self.steps_per_epoch is None else step // self.steps_per_epoch
        rate = 1.0 / (epoch + 1) ** 0.75
        new_ema = ema + rate * (solution[:-1] - ema)
        nu = max(float(new_ema @ pi), 0.0)
        return _Direction(
            alpha=nu * q_alpha,
            upper=new_ema / norms.cpu().numpy(),
            upper_losses=upper_losses,
            nu=nu,
            ema=new_ema,
        )

    def _inner_losses(
        self,
        params: list[Tensor],
        weights: np.ndarray,
        first: Tensor,
        start: np.ndarray,
        present: Any,
    ) -> np.ndarray:
        """``L^train(ω_K)``: K SGD steps on ``softmax(α)ᵀ L^train`` from ω, whose losses are
        ``start`` (the first step along the step's own gradient ``first``, each later one
        re-running the step's closure); stopped early, as the official code, once the inner loss
        passes 1e5."""
        closure = step_closure()
        assert closure is not None
        point = [p.detach() for p in params]
        gradient = first
        if float(weights @ start) > 1e5:
            return start
        for k in range(self.inner_steps + 1):
            if k > 0:
                with moved_to(self.model, params, point), torch.enable_grad():  # type: ignore[arg-type]
                    values = torch.stack(present_losses(closure(), present, self.task_names,
                                                        "forum"))
                    total = torch.as_tensor(weights, dtype=values.dtype,
                                            device=values.device) @ values
                    if k == self.inner_steps or float(total.detach()) > 1e5:
                        return values.detach().double().cpu().numpy()
                    gradient = flatten(gradients_of(total, params, retain_graph=False))
            point = sgd_point(point, gradient, self.inner_lr)
        raise AssertionError("unreachable")


@dataclass(frozen=True)
class _Direction:
    """What one FORUM step found."""

    alpha: np.ndarray
    """Adam's gradient of α: ν times the α part of ∇q."""
    upper: np.ndarray
    """The upper losses' coefficients λ_t / (‖∇F_t‖ + 1e-8) in the step's objective."""
    upper_losses: Tensor
    nu: float
    ema: np.ndarray
    """The new EMA λ of the QP's task weights."""


def progress_qp(gram: np.ndarray, pi: np.ndarray, reward: float) -> np.ndarray:
    """``argmin_{w ≥ 0} wᵀ G w − w_q · reward`` s.t. ``Σ_{t<T} w_t = 1`` and
    ``w_q ≥ Σ_t w_t π_t`` (``w_q`` the last entry): FORUM's problem (14), a convex QP solved by
    SLSQP from the uniform point with the penalty weight at its bound."""
    from scipy.optimize import minimize

    t = len(pi)
    start = np.append(np.full(t, 1.0 / t), max(float(np.mean(pi)), 0.0))
    result = minimize(
        lambda w: float(w @ gram @ w - w[-1] * reward),
        start,
        jac=lambda w: 2 * gram @ w - np.append(np.zeros(t), reward),
        bounds=[(0.0, None)] * (t + 1),
        constraints=[
            {"type": "eq", "fun": lambda w: np.sum(w[:-1]) - 1.0,
             "jac": lambda w: np.append(np.ones(t), 0.0)},
            {"type": "ineq", "fun": lambda w: w[-1] - w[:-1] @ pi,
             "jac": lambda w: np.append(-pi, 1.0)},
        ],
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 500},
    )
    return np.maximum(result.x, 0.0)

