"""The backward path of loss strategies: one backward of the scalarized objective."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..finite import all_finite, finite_tensors
from ..partition import reached_parameters, reaches_other_leaves
from ..stepinfo import StepInfo, spread
from ..strategies.base import LossStrategy, Scalarized
from ..tasks import StepTasks
from ..window import accumulate, union, window_losses, with_values
from .base import PathBase, unreached_loss


class ScalarizedPath(PathBase):
    """Loss strategies: the present tasks' losses scalarized, then one backward of the objective."""

    def _backward_scalarized(self, step: StepTasks, detached: Tensor) -> StepInfo:
        assert isinstance(self._combiner, LossStrategy)
        window = self._window
        device = step.losses[0].device
        params = self._trainable()
        self._check_losses_reach(step, params)
        given = list(step.losses)
        if self._replicas is not None:
            step, given, detached = self._agree_losses(step, detached)
        if window.losses is not None and not self._combiner.linear_in_losses:
            self._warn_once(
                "nonlinear-accumulation",
                f"{self._combiner.info.name}'s task weights depend on the current losses: with "
                "gradient accumulation each micro-batch is weighted by the losses accumulated so "
                "far (the last one by the step's total), not by the step's total losses",
            )
        if self._replicas is not None and not all_finite(detached):
            return self._nonfinite_loss(step, detached)
        fresh = window.losses is None and self._replicas is None
        seen = window_losses(window, step, detached)
        present = step.present
        stacked = [loss.reshape(()).to(device) for loss in given]
        if not fresh:  # weighed at the window's accumulated (or ranks' averaged) losses
            stacked = with_values(stacked, seen[present])
        stacked = torch.stack(stacked)
        with self._combiner.restricted_to(step.restriction):
            scalarized = self._combiner.scalarize(stacked)
        objective = scalarized.loss
        if self._scaling is not None:
            (objective,), _ = self._scaling.scale([objective])
        if self._replicas is None and all(p.grad is None for p in params):
            key = (*step.present.tolist(), -1, *map(id, params))
            closed = self._objective_closed.get(key)
            if closed is None:
                closed = self._objective_closed[key] = not reaches_other_leaves(objective, params)
            if not self._backward_into_grad(objective, params, closed):
                return self._bad_gradient(step, detached, "non-finite gradient of the combined loss")
            params_present = [p for p in params if p.grad is not None]
            # The strategy's own parameters (UW's): what was written, for a later micro-batch.
            self._correct_own(params_present, [p.grad for p in params_present])
            return self._close_scalarized(step, seen, present, scalarized, params_present)
        grads = torch.autograd.grad(objective, params, allow_unused=True)
        if self._replicas is not None:
            anywhere = self._replicas.union(torch.tensor([g is not None for g in grads]))
            grads = tuple(
                (torch.zeros_like(p) if g is None else g) if hit else None
                for p, g, hit in zip(params, grads, anywhere.tolist(), strict=True)
            )
        reached = [(p, g) for p, g in zip(params, grads, strict=True) if g is not None]
        grads_present = [g for _, g in reached]
        if self._replicas is not None:
            grads_present = self._replicas.mean(grads_present)
        if not finite_tensors(grads_present):
            return self._bad_gradient(step, detached, "non-finite gradient of the combined loss")
        params_present = [p for p, _ in reached]
        accumulate(params_present, self._correct_own(params_present, grads_present), fresh=True)
        return self._close_scalarized(step, seen, present, scalarized, params_present)

    @staticmethod
    def _backward_into_grad(objective: Tensor, params: list[Tensor], closed: bool) -> bool:
        """``objective.backward(inputs=params)`` into ``.grad`` that are all ``None``: autograd's
        own accumulation, which keeps a fresh gradient as ``.grad`` without a copy, as plain
        ``loss.backward()`` does. Where the objective's graph reaches no leaf but ``params``
        (``closed``, found by walking it once per set of tasks and parameters) the two are the same
        and the ``inputs=`` restriction is dropped: it cost 3–4 % of a step on the small-model MLP
        of docs/perf.md. Whether every gradient is finite; if not, or if the backward raises,
        every ``.grad`` is ``None`` again (nothing changed)."""
        finite = False
        try:
            torch.autograd.backward(objective, inputs=None if closed else params)
            finite = finite_tensors([p.grad for p in params])
        finally:
            if not finite:
                for p in params:
                    p.grad = None
        return finite

    def _close_scalarized(
        self,
        step: StepTasks,
        seen: Tensor,
        present: np.ndarray,
        scalarized: Scalarized,
        params_present: list[Tensor],
    ) -> StepInfo:
        window = self._window
        window.losses = seen
        window.present = union(window.present, present)
        window.commit = self._combiner.commit_restricted(step.restriction, scalarized.commit)
        window.marker = params_present[0] if params_present else None
        window.info = self._info(step, seen, window.present, spread(scalarized.weights, step))
        return window.info

    def _agree_losses(
        self, step: StepTasks, detached: Tensor
    ) -> tuple[StepTasks, list[Tensor], Tensor]:
        """Loss path under torch.distributed: the tasks of any rank, their losses averaged over
        the ranks that have them; a task's loss here is scaled so that averaging the gradients
        over all ranks averages it over those ranks only, and a task absent here enters as its
        (constant) mean."""
        agreement = self._agreement(step, detached, None)
        union = torch.nonzero(agreement.counts).reshape(-1).numpy()
        mine = dict(zip(step.present.tolist(), step.losses, strict=True))
        size = self._replicas.size  # type: ignore[union-attr]
        given = []
        for task in union.tolist():
            mean = agreement.losses[task]
            if task in mine:
                loss = mine[task] * (size / int(agreement.counts[task]))
                given.append(with_values([loss], mean.reshape(1))[0])
            else:
                given.append(mean.to(step.losses[0]).detach())
        united = StepTasks(step.names, union, tuple(given))
        return united, given, agreement.losses[union].to(detached.device)

    def _check_losses_reach(self, step: StepTasks, params: list[Tensor]) -> None:
        """A loss that reaches no parameter of the optimizer is an error (checked by walking the
        graphs once per combination of present tasks and trainable parameters)."""
        key = (*step.present.tolist(), -1, *map(id, params))
        if key in self._loss_reach_checked:
            return
        for name, loss in zip(step.present_names, step.losses, strict=True):
            if not reached_parameters(loss, params):
                raise unreached_loss(name)
        self._loss_reach_checked.add(key)
