"""MOML: task weights meta-learned as a multi-objective upper-level problem."""

from __future__ import annotations

from collections.abc import Callable
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
    trainable_parameters,
)
from ..registry import register
from ..solvers import min_norm_simplex
from ._adam import AdamState, adam_step
from ._state import TaskAxes
from .base import LossStrategy, Scalarized
from .coba import softmax


@register(
    "moml",
    kind="structural",
    hooks=("model", "validation"),
    cost="2T + 1 backward (T at θ, T at a virtual step), 2 forward",
    stateful=True,
    paper="Ye, Lin, Yue, Guo, Xiao & Zhang, Multi-Objective Meta Learning, NeurIPS 2021 "
    "(AIJ 2024)",
    conventions="LibMTL's implementation (written by an author of the paper; its one-inner-step "
    "form): weights "
    "softmax(α) from α = 0 (uniform); one inner SGD step with inner_lr=0.1 on every trainable "
    "parameter of the model; the T upper gradients made unit-length (LibMTL's 'l2' normaliser) "
    "and combined by the exact min-norm point of their hull (LibMTL runs MGDA's iterative "
    "solver); Adam on α with lr 1e-3 (outer_lr); the step trains on softmax(α)ᵀL with the new "
    "α. Upper losses from the validation closure, lower losses from the step's batch (LibMTL "
    "draws both from two extra half-batches of training data)",
)
class MOML(LossStrategy):
    """MOML (Ye, Lin, Yue, Guo, Xiao & Zhang, NeurIPS 2021; AIJ 2024), its multi-task form as
    LibMTL implements it: the task weights ``λ = softmax(α)`` are the
    upper-level variable of a bilevel problem whose upper level has one objective per task.

    With one inner SGD step ``θ'(α) = θ − η Σ_j λ_j ∇L_j^train(θ)`` the hypergradient of task
    t's upper loss is exact without second derivatives of the model::

        h_t = ∂ L_t^val(θ'(α)) / ∂α = −η J_softmax(α) G_f g_t,
        G_f = [∇L_j^train(θ)]_j (T × P),  g_t = ∇_{θ'} L_t^val(θ'),  J_softmax = diag(λ) − λλᵀ

    (T backward passes at θ, T at θ', one T×T cross-Gramian). The T vectors ``h_t`` are made
    unit-length and combined by the min-norm point of their convex hull (MGDA,
    :func:`mtlopt.solvers.min_norm_simplex`): a common descent direction for every task's upper
    loss, by which Adam steps α. The step then trains on ``softmax(α)ᵀ L^train`` with the new α.

    The parameters are moved to θ' by swapping their storage and restored after (buffers too);
    LibMTL evaluates θ' on a deep copy. Both hold one more copy of θ.

    Usage::

        opt = mtlopt.MTLOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), "moml",
                                  model=model,
                                  validation=lambda: task_losses(model, next(val_batches)))
        opt.step(task_losses(model, batch))

    Args:
        model: the model whose trainable parameters take the inner step (heads included).
        validation: a closure returning the upper-level losses of a fresh batch (a dict by task
            name, or a list in task order), called once per step at θ'.
        inner_lr: the inner SGD step's learning rate η (LibMTL's ``inner_lr``, default 0.1).
        weight_lr: Adam's learning rate on α (LibMTL's ``outer_lr``, default 1e-3).
    """

    absent_tasks = (
        "the weights are the softmax over the present tasks' α; an absent task's α and Adam "
        "state wait; the validation closure must give every present task a loss"
    )

    _state_attrs = ("logits", "_adam")
    _task_state: ClassVar[dict[str, TaskAxes]] = {
        "logits": TaskAxes((0,), 0.0),
        "_adam": TaskAxes((0,), 0.0),
    }

    def __init__(
        self,
        model: nn.Module | None = None,
        validation: Callable[[], Any] | None = None,
        inner_lr: float = 0.1,
        weight_lr: float = 1e-3,
        num_tasks: int | None = None,
    ) -> None:
        super().__init__(num_tasks)
        if not inner_lr > 0 or not weight_lr > 0:
            raise ValueError(
                f"inner_lr and weight_lr must be positive, got {inner_lr} and {weight_lr}"
            )
        check_model(model)
        self.model, self.validation = model, validation
        self.inner_lr, self.weight_lr = float(inner_lr), float(weight_lr)
        self.logits: np.ndarray | None = None
        self._adam: AdamState | None = None

    def hyperparameters(self) -> dict[str, object]:
        return {"inner_lr": self.inner_lr, "weight_lr": self.weight_lr}

    def _build(self) -> None:
        assert self.num_tasks is not None
        if self.logits is None:
            self.logits = np.zeros(self.num_tasks)
            self._adam = AdamState.zeros(self.num_tasks)

    def scalarize(self, losses: Tensor) -> Scalarized:
        missing = [n for n in ("model", "validation") if getattr(self, n) is None]
        if missing:
            raise TypeError(
                f"moml needs {' and '.join(missing)}: MTLOptimizer(opt, 'moml', model=model, "
                "validation=lambda: val_losses(next(val_batches))); nothing was changed"
            )
        if self.logits is None:
            self.num_tasks = self.num_tasks or losses.shape[0]
            self._build()
        assert self.logits is not None and self._adam is not None
        hyper = self.upper_gradients(losses, self.logits)
        norms = np.linalg.norm(hyper, axis=1, keepdims=True)
        unit = np.divide(hyper, norms, out=np.zeros_like(hyper), where=norms > 0)
        direction = min_norm_simplex(unit @ unit.T) @ unit
        logits, adam = adam_step(self.logits, direction, self._adam, self.weight_lr)
        w = torch.as_tensor(softmax(logits), dtype=losses.dtype, device=losses.device)

        def commit() -> None:
            self.logits, self._adam = logits, adam

        return Scalarized(loss=w @ losses, weights=w.detach(), commit=commit)

    def upper_gradients(self, losses: Tensor, logits: np.ndarray) -> np.ndarray:
        """The rows ``h_t = ∂L_t^val(θ'(α))/∂α`` for the present tasks (T × T, float64)."""
        assert self.model is not None and self.validation is not None
        params = trainable_parameters(self.model)
        weights = softmax(logits)
        lower = [flatten(gradients_of(loss, params, retain_graph=True)) for loss in losses]
        inner = sum(w * g for w, g in zip(weights.tolist(), lower, strict=True))
        moved = sgd_point([p.detach() for p in params], inner, self.inner_lr)
        with moved_to(self.model, params, moved), torch.enable_grad():
            present = range(len(lower)) if self._present is None else self._present
            upper_losses = present_losses(self.validation(), present, self.task_names, "moml")
            upper = [
                flatten(gradients_of(loss, params, retain_graph=k < len(upper_losses) - 1))
                for k, loss in enumerate(upper_losses)
            ]
        cross = (torch.stack(upper).double() @ torch.stack(lower).double().T).cpu().numpy()
        jacobian = np.diag(weights) - np.outer(weights, weights)  # of softmax, symmetric
        return -self.inner_lr * cross @ jacobian

