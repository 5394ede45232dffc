"""Representation mode (MGDA-UB, LibMTL's ``rep_grad``): per-task gradients of shared features,
combined, and back-propagated through the trunk once."""

from __future__ import annotations

import torch
from torch import Tensor

from ..finite import check_tasks, finite_tensors
from ..stepinfo import StepInfo
from ..strategies.base import GradientStrategy
from ..tasks import StepTasks
from ..window import accumulate, union, window_losses
from .base import PathBase


class RepresentationPath(PathBase):
    """Representation mode: per-task gradients of the shared features, combined, then one backward
    through the trunk."""

    def _backward_representation(
        self,
        step: StepTasks,
        losses: list[Tensor],
        detached: Tensor,
        features: Tensor,
        scale: float,
    ) -> StepInfo:
        assert isinstance(self._combiner, GradientStrategy)
        if not self._combiner.supports_representation:
            raise ValueError(f"{self._combiner.info.name} does not support representation mode")
        if not isinstance(features, Tensor) or not features.requires_grad:
            raise ValueError("features must be a tensor that requires grad (the trunk's output)")
        window = self._window
        partition = self._partition_for(step, losses, self._trainable(), features=features)
        per_task = [
            torch.autograd.grad(
                loss,
                [features, *partition.specific[task]],
                retain_graph=True,
                allow_unused=True,
                materialize_grads=True,
            )
            for loss, task in zip(losses, step.present, strict=True)
        ]
        jacobian = torch.stack([grads[0].reshape(-1) for grads in per_task])
        if scale != 1.0:
            jacobian.mul_(1.0 / scale)
        own_grads = [list(grads[1:]) for grads in per_task]
        checks = check_tasks(jacobian, own_grads)
        for name, check in zip(step.present_names, checks, strict=True):
            if not check.finite:
                return self._bad_gradient(step, detached, f"non-finite gradient for task {name!r}")
        self._warn_zero_tasks(step, checks)
        try:
            with self._combiner.restricted_to(step.restriction):
                combined = self._combiner.combine(jacobian, detached.to(jacobian.device))
        except FloatingPointError as error:
            return self._nonfinite(step, detached, str(error))
        trunk = torch.autograd.grad(
            features,
            partition.shared,
            grad_outputs=(combined.direction * scale).view_as(features),
            allow_unused=True,
            materialize_grads=True,
        )
        if not finite_tensors(trunk):
            return self._bad_gradient(
                step, detached, f"{self._combiner.info.name} produced a non-finite update"
            )
        accumulate(partition.shared, trunk)
        for task, grads in zip(step.present, per_task, strict=True):
            accumulate(partition.specific[task], grads[1:])
        window.losses = window_losses(window, step, detached)
        window.present = union(window.present, step.present)
        window.commit = self._combiner.commit_restricted(step.restriction, combined.commit)
        window.marker = partition.shared[0] if partition.shared else None
        window.info = self._gradient_info(step, window.losses, step.present, jacobian, combined)
        return window.info
