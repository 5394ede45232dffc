"""Auto-λ: task weights meta-learned by a virtual step and the primary tasks' validation loss."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ..bilevel import (
    check_model,
    gradients_of,
    moved_to,
    step_closure,
    step_sizes,
    trainable_parameters,
    virtual_point,
)
from ..registry import register
from ._adam import AdamState, adam_step
from ._state import TaskAxes
from .base import LossStrategy, Scalarized

Hypergradient = Literal["finite_difference", "exact"]


@register(
    "auto_lambda",
    kind="structural",
    hooks=("model", "validation", "closure"),
    cost="1 backward + virtual step (2 backward, 3 forward)",
    stateful=True,
    paper="Liu et al., Auto-Lambda: Disentangling Dynamic Task Relationships, TMLR 2022",
    conventions="official code (lorenmt/auto-lambda): λ init 0.1, Adam on λ with lr 1e-4, update "
    "every step, unconstrained λ; virtual step with the wrapped optimizer's lr, SGD momentum buffer "
    "and weight decay; finite-difference hypergradient at ±0.01 along the validation gradient "
    "(hypergradient='exact': T backward instead); primary=None: every task",
)
class AutoLambda(LossStrategy):
    """Auto-λ (Liu, Li, Kuang, Xu & Davison, TMLR 2022, Eqs. 3–5).

    The step minimises ``Σ_t λ_t L_t^train(θ)``. Before it, the task weights λ take one step on the
    primary tasks' validation loss after a virtual training step::

        θ'  = θ − α ∇_θ Σ_t λ_t L_t^train(θ)                (+ momentum and weight decay)
        ∇_λ L^val(θ') = −α ∇²_{λ,θ} Σ_t λ_t L_t^train(θ) · d,   d = ∇_{θ'} Σ_{p ∈ primary} L_p^val(θ')
                      ≈ −α [L^train(θ + ε d) − L^train(θ − ε d)] / (2ε),   ε = 0.01 / ‖d‖

    (``∂/∂λ_t`` of ``Σ λ L`` is ``L_t``, so the finite difference needs two forward passes of the
    training batch, no backward). ``hypergradient="exact"`` uses ``−α ⟨∇_θ L_t^train(θ), d⟩``
    instead (T backward passes). λ is stepped by Adam (lr ``weight_lr``), then the step trains on
    ``Σ λ_t L_t`` with the new λ, as the official code.

    Under gradient accumulation every ``backward`` takes its own meta-step from the same λ (on
    its micro-batch) and the step keeps the last one's; the closure is re-run for the finite
    difference only by ``step(closure)``.

    Where the wrapped optimizer has several parameter groups, each parameter moves by its own
    group's learning rate (the official code reads the first group's); the finite difference then
    runs along ``α ⊙ d``, which is the official ``α d`` for one learning rate.

    The model's parameters are moved to θ', θ ± εd and back by swapping their storage; the model's
    buffers (BatchNorm statistics) are restored after each extra forward pass. The official code
    evaluates the virtual point on a deep copy; both hold one extra copy of θ.

    Usage::

        opt = mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                  "auto_lambda", model=model, primary=["seg"],
                                  validation=lambda: task_losses(model, next(val_batches)))
        opt.step(lambda: task_losses(model, batch))   # a closure: the training batch is re-run

    Args:
        model: the model whose parameters the virtual step moves (every parameter that requires
            grad, heads included, as the official code).
        validation: a closure returning the validation losses (a dict by task name, or a list in
            task order) of a fresh validation batch; called once per step, at the virtual point.
        primary: the primary tasks (names of the validation losses, or indices); ``None``: every
            task (Auto-λ's multi-task setting).
        init: initial λ (default 0.1).
        weight_lr: Adam learning rate of λ (default 1e-4, the official dense-prediction value; 3e-4
            for its CIFAR-100 setting).
        hypergradient: ``"finite_difference"`` (default, the paper's; the step must be given a
            closure) or ``"exact"``.
        epsilon: the finite difference's step ``‖ε d‖`` (default 0.01).
    """

    absent_tasks = (
        "an absent task's λ is neither used nor stepped (its Adam state waits); the validation "
        "loss is that of the primary tasks given"
    )

    _state_attrs = ("weights", "_adam")
    _task_state: ClassVar[dict[str, TaskAxes]] = {
        "weights": TaskAxes((0,), 0.1),
        "_adam": TaskAxes((0,), 0.0),
    }

    def __init__(
        self,
        model: nn.Module | None = None,
        validation: Callable[[], Any] | None = None,
        primary: str | int | Sequence[str | int] | None = None,
        init: float = 0.1,
        weight_lr: float = 1e-4,
        hypergradient: Hypergradient = "finite_difference",
        epsilon: float = 0.01,
        num_tasks: int | None = None,
    ) -> None:
        super().__init__(num_tasks)
        if hypergradient not in ("finite_difference", "exact"):
            raise ValueError(
                f"hypergradient must be 'finite_difference' or 'exact', got {hypergradient!r}"
            )
        if not weight_lr > 0 or not epsilon > 0:
            raise ValueError("weight_lr and epsilon must be positive")
        check_model(model)
        self.model, self.validation = model, validation
        self.primary = [primary] if isinstance(primary, (str, int)) else primary
        self.init, self.weight_lr, self.epsilon = float(init), float(weight_lr), float(epsilon)
        self.hypergradient = hypergradient
        self.weights: np.ndarray | None = None
        self._adam: AdamState | None = None
        self._optimizer: torch.optim.Optimizer | None = None

    def hyperparameters(self) -> dict[str, object]:
        return {
            "primary": self.primary,
            "init": self.init,
            "weight_lr": self.weight_lr,
            "hypergradient": self.hypergradient,
        }

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Called by :class:`~mtlopt.MTLOptimizer`: the virtual step uses its learning rates."""
        self._optimizer = optimizer

    def _build(self) -> None:
        assert self.num_tasks is not None
        if self.weights is None:
            self.weights = np.full(self.num_tasks, self.init)
            self._adam = AdamState.zeros(self.num_tasks)

    # The step ----------------------------------------------------------------------------------
    def scalarize(self, losses: Tensor) -> Scalarized:
        self._check_ready()
        if self.weights is None:
            self.num_tasks = self.num_tasks or losses.shape[0]
            self._build()
        assert self.weights is not None and self._adam is not None
        weights = self.weights
        hyper = self._hypergradient(losses, weights)
        new_weights, new_adam = adam_step(weights, hyper, self._adam, self.weight_lr)
        w = torch.as_tensor(new_weights, dtype=losses.dtype, device=losses.device)

        def commit() -> None:
            self.weights, self._adam = new_weights, new_adam

        return Scalarized(loss=w @ losses, weights=w.detach(), commit=commit)

    def _check_ready(self) -> None:
        missing = [n for n in ("model", "validation") if getattr(self, n) is None]
        if missing:
            raise TypeError(
                f"auto_lambda needs {' and '.join(missing)}: MTLOptimizer(opt, 'auto_lambda', "
                "model=model, validation=lambda: val_losses(next(val_batches)), primary=[...]); "
                "nothing was changed"
            )
        if self.hypergradient == "finite_difference" and step_closure() is None:
            raise TypeError(
                "auto_lambda's finite-difference hypergradient re-runs the training batch: step "
                "with a closure, opt.step(lambda: task_losses(model, batch)), or create it with "
                "hypergradient='exact'; nothing was changed"
            )

    def _hypergradient(self, losses: Tensor, weights: np.ndarray) -> np.ndarray:
        """``∂ L^val(θ'(λ)) / ∂λ`` for the present tasks."""
        assert self.model is not None
        params = trainable_parameters(self.model)
        lam = torch.as_tensor(np.asarray(weights), dtype=losses.dtype, device=losses.device)
        grads = gradients_of(lam @ losses, params, retain_graph=True)
        sizes = step_sizes(params, self._optimizer)
        with moved_to(self.model, params, virtual_point(params, grads, sizes)):
            with torch.enable_grad():
                validation = self._primary_loss(self.validation())  # type: ignore[misc]
            d = gradients_of(validation, params, retain_graph=False)
        scaled = [size["lr"] * g for size, g in zip(sizes, d, strict=True)]  # α ⊙ d
        if self.hypergradient == "exact":
            per_task = [gradients_of(loss, params, retain_graph=True) for loss in losses]
            return -np.array(
                [float(sum((g * v).sum() for g, v in zip(gs, scaled, strict=True))) for gs in per_task]
            )
        norm = float(torch.sqrt(sum((v.double() ** 2).sum() for v in scaled)))
        if norm == 0.0:
            return np.zeros(losses.shape[0])
        eps = self.epsilon / norm
        ends = []
        for sign in (1.0, -1.0):
            moved = [p.detach() + sign * eps * v for p, v in zip(params, scaled, strict=True)]
            with moved_to(self.model, params, moved), torch.no_grad():
                ends.append(self._training_losses(losses.shape[0]))
        return -((ends[0] - ends[1]) / (2 * eps)).double().cpu().numpy()

    def _training_losses(self, count: int) -> Tensor:
        """The present tasks' training losses re-evaluated by the step's closure."""
        closure = step_closure()
        assert closure is not None
        given = closure()
        entries = list(given.values()) if isinstance(given, Mapping) else list(given)
        values = torch.stack(  # absent tasks (None) are left out, as in the step
            [torch.as_tensor(v).detach().reshape(()) for v in entries if v is not None]
        )
        if values.shape[0] != count:
            raise ValueError(
                f"the closure returned {values.shape[0]} losses; the step has {count} tasks"
            )
        return values

    def _primary_loss(self, given: Any) -> Tensor:
        if isinstance(given, Mapping):
            names = list(given)
            chosen = names if self.primary is None else self.primary
            picked = []
            for key in chosen:
                name = names[key] if isinstance(key, int) else key
                if name not in given or given[name] is None:
                    raise KeyError(
                        f"auto_lambda: the validation closure gave no loss for primary task "
                        f"{name!r} (it gave {names})"
                    )
                picked.append(given[name])
        else:
            values = list(given.reshape(-1)) if isinstance(given, Tensor) else list(given)
            chosen = range(len(values)) if self.primary is None else self.primary
            if any(isinstance(k, str) for k in chosen):
                raise TypeError(
                    "auto_lambda: primary tasks given by name need a validation closure that "
                    "returns a dict of losses by task name"
                )
            picked = [values[int(k)] for k in chosen]  # type: ignore[call-overload]
        return torch.stack([loss.reshape(()) for loss in picked]).sum()

