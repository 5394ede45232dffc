"""Hugging Face ``Trainer`` with a multi-task strategy.

The model returns its task losses under ``losses`` (a dict or a ``ModelOutput``)::

    def forward(self, input_ids, labels_a, labels_b):
        h = self.encoder(input_ids).last_hidden_state[:, 0]
        return {"losses": {"a": ce(self.head_a(h), labels_a), "b": mse(self.head_b(h), labels_b)}}

    trainer = MTLTrainer(model=model, args=TrainingArguments(...), train_dataset=data,
                         strategy="pcgrad")
    trainer.train()

Everything else is the Trainer's own: its optimizer (wrapped in :class:`~mtlopt.MTLOptimizer`),
learning-rate scheduler, gradient accumulation (the per-task gradients of the micro-batches are
summed and combined once), gradient clipping, checkpoints (the strategy's state is part of the
optimizer's) and bf16 autocast. The losses reach :meth:`MTLOptimizer.backward` as the model
returns them, so whatever the optimizer accepts (a task missing from a batch, for instance) the
Trainer accepts too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer

from ..optimizer import MTLOptimizer, StepInfo
from ..strategies.base import Strategy
from .schedules import follow_new_groups

StrategySpec = str | Strategy | Callable[[nn.Module], Strategy]
"""A strategy's name, an instance, or a function of the model returning one (for strategies that
need the model, such as DTME: ``lambda m: mtlopt.create("dtme", blocks=m.blocks, num_tasks=2)``)."""


def task_losses(outputs: Any) -> Mapping[str, Tensor | None]:
    """The ``losses`` mapping of a model's outputs, or a ``TypeError`` saying what to return."""
    losses = outputs.get("losses") if isinstance(outputs, Mapping) else None
    if losses is None:
        losses = getattr(outputs, "losses", None)
    if not isinstance(losses, Mapping):
        raise TypeError(
            "MTLTrainer needs the model to return its task losses by name under 'losses', e.g. "
            "`return {'losses': {'seg': seg_loss, 'depth': depth_loss}}` (a dict or a "
            f"ModelOutput); got {type(outputs).__name__}"
        )
    return losses


def build_strategy(spec: StrategySpec, model: nn.Module) -> str | Strategy:
    if isinstance(spec, (str, Strategy)):
        return spec
    return spec(model)


class MTLTrainer(Trainer):
    """A ``transformers.Trainer`` whose optimizer combines the model's task losses with
    ``strategy``.

    Args:
        strategy: see :data:`StrategySpec`.
        mtl_options: keyword arguments of :class:`~mtlopt.MTLOptimizer` (``shared=``,
            ``nonfinite=``, ``diagnostics=``, strategy hyperparameters).
        log_diagnostics: add the last step's :meth:`StepInfo.as_dict` (losses, weights, gradient
            norms, cosines per task) to the Trainer's training logs under ``mtl/``.

    Every other argument is the Trainer's own.

    With ``optimizers=(optimizer, scheduler)`` the given optimizer must already be an
    ``MTLOptimizer``.
    """

    def __init__(
        self,
        *args: Any,
        strategy: StrategySpec = "ew",
        mtl_options: dict[str, Any] | None = None,
        log_diagnostics: bool = True,
        **kwargs: Any,
    ) -> None:
        self.mtl_strategy = strategy
        self.mtl_options = dict(mtl_options or {})
        self.log_diagnostics = log_diagnostics
        self.last_step_info: StepInfo | None = None
        super().__init__(*args, **kwargs)
        if self.args.fp16:
            raise NotImplementedError(
                "MTLTrainer supports bf16 (TrainingArguments(bf16=True)) but not fp16: fp16 needs "
                "a loss scaler per task; train with bf16, or write the loop with "
                "MTLOptimizer(..., scaler=torch.amp.GradScaler())"
            )

    @property
    def mtl_optimizer(self) -> MTLOptimizer:
        optimizer = self.optimizer
        while optimizer is not None and not isinstance(optimizer, MTLOptimizer):
            optimizer = getattr(optimizer, "optimizer", None)  # accelerate's wrapper
        if optimizer is None:
            raise RuntimeError(
                "MTLTrainer has no MTLOptimizer: pass optimizers=(MTLOptimizer(...), scheduler) or "
                "let the Trainer create its optimizer"
            )
        return optimizer

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(*args, **kwargs)
        if not isinstance(optimizer, MTLOptimizer):
            model = args[0] if args else kwargs.get("model") or self.model
            strategy = build_strategy(self.mtl_strategy, model)
            self.optimizer = MTLOptimizer(optimizer, strategy, **self.mtl_options)
        return self.optimizer

    def create_scheduler(self, *args: Any, **kwargs: Any) -> Any:
        scheduler = super().create_scheduler(*args, **kwargs)
        self.mtl_optimizer.register_step_post_hook(
            lambda *_: follow_new_groups(self.lr_scheduler, self.mtl_optimizer)
        )
        return scheduler

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Any = None,
    ) -> Tensor:
        model.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            outputs = model(**inputs)
        # Each micro-batch's losses are means over it: dividing by the number of micro-batches makes
        # the summed per-task gradients those of the mean over the whole batch.
        micro = getattr(self, "current_gradient_accumulation_steps", None)
        micro = micro or self.args.gradient_accumulation_steps
        losses = {
            name: None if loss is None else loss / micro
            for name, loss in task_losses(outputs).items()
        }
        self.last_step_info = self.mtl_optimizer.backward(losses)
        present = [loss.detach().float() for loss in losses.values() if loss is not None]
        return torch.stack(present).sum() if present else torch.zeros((), device=self.args.device)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Tensor | tuple[Tensor, Any]:
        """For evaluation: the sum of the task losses (the model's ``loss``, if it returns one)."""
        outputs = model(**inputs)
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else None
        if loss is None:
            present = [v for v in task_losses(outputs).values() if v is not None]
            loss = torch.stack(present).sum()
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        info = self.mtl_optimizer.last_step if self.optimizer is not None else None
        if self.log_diagnostics and "loss" in logs and info is not None:
            logs = {**logs, **{f"mtl/{k}": float(v) for k, v in info.as_dict().items()}}
        super().log(logs, *args, **kwargs)
