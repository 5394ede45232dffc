"""ConsMTL: an α-fair update of the shared parameters and a consistency term on the heads."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from ..registry import register
from ..saliency import RepresentationTap
from ..solvers import fair_weights
from .base import Combined, GradientStrategy, HeadExtra, check_max_norm, clip_weights, gramian_of

HEAD_CLIP_EPS = 1e-6
"""``torch.nn.utils.clip_grad_norm_``'s guard, ``max_norm / (norm + 1e-6)``, as in the code."""


@register(
    "consmtl",
    kind="structural",
    hooks=("representation",),
    cost="T backward + T to the features, double backward to the heads",
    stateful=False,
    paper="Qin et al., Towards Consistent Multi-Task Learning: Unlocking the Potential of "
    "Task-Specific Parameters, CVPR 2025",
    conventions="the authors' code (jianke0604/NTKMTL, methods/weight_methods.py, ConsMTL), "
    "the paper's text not consulted: α > 0 with G α = α^{-1/2} (FairGrad's α-fair condition "
    "with fairness 2, solved exactly by Newton's method; the code uses scipy least_squares from "
    "1/T, same root); shared update T Σ α_t g_t clipped to norm 1 (times_tasks=True, "
    "max_norm=1.0); λ = 1; head extra clipped to 0.1 × the norm of the task's own head gradient "
    "(clip_grad_norm_, +1e-6); δ̄ = Σ α_t δ_t with α before ×T and clipping; z is the shared "
    "representation (the code's QM9/CelebA setting; on NYUv2/Cityscapes it takes each task's own "
    "decoder features); a task whose loss does not reach z gets no extra head gradient",
)
class ConsMTL(GradientStrategy):
    """ConsMTL (Qin et al., CVPR 2025).

    The shared parameters get an α-fair combination of the task gradients ``g_t`` (rows of
    ``J``); each task's own parameters ``θ_t`` (its head) get, besides their gradient, a term that
    pulls the task's gradient on the shared representation ``z`` (the output of the module given
    as ``representation``) towards the combined one, so that the heads move consistently with
    the shared update::

        G α = α^{-1/2},  α > 0                         (G = J Jᵀ)
        shared:  d = T Σ_t α_t g_t,   then d ← d · min(1, max_norm / ‖d‖)
        δ_t = ∂ℓ_t/∂z (with a graph),   δ̄ = Σ_t α_t δ_t (detached)
        e_t = ∇_{θ_t} (−λ ⟨δ_t, δ̄⟩)                    (a double backward through the head)
        θ_t:  ∇_{θ_t} ℓ_t + e_t · min(1, c ‖∇_{θ_t} ℓ_t‖ / (‖e_t‖ + 10⁻⁶))

    The equations, the names and every default are those of the authors' code (jianke0604/NTKMTL,
    ``methods/weight_methods.py``, class ``ConsMTL``): we did not have the paper's text. ``α``
    solves FairGrad's condition ``G w = w^{-1/a}`` with fairness ``a = 2``
    (:func:`mtlopt.solvers.fair_weights`, Newton's method to rounding; the code runs scipy's
    ``least_squares`` on ``Gα − α^{-1/2}`` from ``1/T`` with ``α ≥ 0``, which finds the same
    unique root). The code multiplies the shared update by ``T`` and clips it to norm 1
    (``times_tasks``, ``max_norm``), weights ``δ̄`` with ``α`` itself (before ``×T`` and
    clipping), and clips ``e_t`` with ``clip_grad_norm_`` to ``c = 0.1`` times the norm of the
    task's own head gradient (``head_clip``). The code's ``z`` is, on QM9 and CelebA, the shared
    representation (as here); on NYUv2 and Cityscapes each task's own decoder features.

    ``δ_t`` is taken when the optimizer prepares each task's loss, and the step's graph is kept
    through the per-task backward passes until the extra head gradients are taken after the
    combination (``adds_head_gradients``). Not in representation mode (``features=``) nor under
    torch.distributed (each rank's extra head gradients would differ); under gradient
    accumulation each micro-batch's extra uses its own ``δ_t`` and the weights of the step so far
    (a warning says so). Without an optimizer (``aggregate``) it is the shared update alone.

    Usage::

        opt = mtlopt.MTLOptimizer(torch.optim.Adam(model.parameters()), "consmtl",
                                  representation=model.encoder)
        opt.step(task_losses(model, batch))     # the forward pass ran through model.encoder

    Args:
        representation: the module whose output is the shared representation ``z`` (a forward hook
            records it).
        consistency_weight: λ (default 1, the code's).
        head_clip: c, the extra head gradient's largest norm relative to the head's own gradient
            (default 0.1, the code's; None: not clipped).
        times_tasks: multiply the shared update by T (default True, the code's).
        max_norm: then clip it to this norm (default 1.0, the code's; None: not clipped).
    """

    absent_tasks = (
        "α solved among the present tasks, T the number of present tasks, δ̄ over the present "
        "tasks; an absent task's head gets no gradient"
    )
    supports_representation: ClassVar[bool] = False
    adds_head_gradients: ClassVar[bool] = True

    def __init__(
        self,
        representation: nn.Module | None = None,
        consistency_weight: float = 1.0,
        head_clip: float | None = 0.1,
        times_tasks: bool = True,
        max_norm: float | None = 1.0,
        num_tasks: int | None = None,
    ) -> None:
        super().__init__(num_tasks)
        if not consistency_weight >= 0:
            raise ValueError(f"consistency_weight must be >= 0, got {consistency_weight}")
        if head_clip is not None and not head_clip >= 0:
            raise ValueError(f"head_clip must be >= 0 or None, got {head_clip}")
        check_max_norm(max_norm)
        self.tap = None if representation is None else RepresentationTap(representation)
        self.consistency_weight = float(consistency_weight)
        self.head_clip = None if head_clip is None else float(head_clip)
        self.times_tasks, self.max_norm = times_tasks, max_norm
        self._z: Tensor | None = None
        self._saliencies: dict[int, Tensor | None] = {}
        """This backward's ``δ_t`` by task (full task order); ``None``: the loss misses ``z``."""

    def hyperparameters(self) -> dict[str, object]:
        return {
            "consistency_weight": self.consistency_weight, "head_clip": self.head_clip,
            "times_tasks": self.times_tasks, "max_norm": self.max_norm,
        }  # fmt: skip

    def transform_loss(self, index: int, loss: Tensor) -> Tensor:
        """Takes ``δ_t = ∂ℓ_t/∂z`` with a graph (the loss itself is unchanged)."""
        if index == 0:
            if self.tap is None:
                raise TypeError(
                    "consmtl needs the shared representation: MTLOptimizer(opt, 'consmtl', "
                    "representation=model.encoder) (the module whose output the heads read); "
                    "nothing was changed"
                )
            self._z, self._saliencies = self.tap.take(), {}
        assert self._z is not None
        task = index if self._present is None else int(self._present[index])
        (delta,) = torch.autograd.grad(
            loss, self._z, retain_graph=True, create_graph=True, allow_unused=True
        )
        self._saliencies[task] = delta
        return loss

    def combine(self, jacobian: Tensor, losses: Tensor | None = None) -> Combined:
        gramian = gramian_of(jacobian)
        alpha = fair_weights(gramian, alpha=2.0)
        weights = alpha * len(alpha) if self.times_tasks else alpha
        weights = clip_weights(weights, gramian, self.max_norm)
        if not np.all(np.isfinite(weights)):
            raise FloatingPointError(f"consmtl produced non-finite task weights {weights}")
        w = torch.from_numpy(np.ascontiguousarray(weights)).to(jacobian)
        return Combined(
            direction=w @ jacobian, weights=w, gramian=gramian, head_extra=self._head_extra(alpha)
        )

    def _head_extra(self, alpha: np.ndarray) -> HeadExtra | None:
        """The heads' consistency gradients from this backward's ``δ_t`` (which it releases)."""
        saliencies, self._saliencies, self._z = self._saliencies, {}, None
        tasks = np.arange(len(alpha)) if self._present is None else self._present
        terms = [
            float(a) * saliencies[int(t)].detach()  # type: ignore[union-attr]
            for a, t in zip(alpha, tasks, strict=True)
            if saliencies.get(int(t)) is not None
        ]
        if not terms or self.consistency_weight == 0:
            return None
        target = torch.stack(terms).sum(dim=0)
        weight, clip = self.consistency_weight, self.head_clip

        def head_extra(task: int, params: list[Tensor], grads: list[Tensor | None]):
            delta = saliencies.get(task)
            if delta is None or not params:
                return [None] * len(params)
            extra_loss = -weight * (delta * target.to(delta.dtype)).sum()
            if not extra_loss.requires_grad:
                return [None] * len(params)
            extra = torch.autograd.grad(extra_loss, params, retain_graph=True, allow_unused=True)
            return list(extra) if clip is None else clip_relative(list(extra), grads, clip)

        return head_extra


def clip_relative(
    extra: list[Tensor | None], reference: list[Tensor | None], ratio: float
) -> list[Tensor | None]:
    """``extra`` scaled by ``min(1, ratio ‖reference‖ / (‖extra‖ + 1e-6))``, the norms over all
    the tensors (``clip_grad_norm_(params, ratio · ‖reference‖)`` with ``extra`` as gradients)."""
    present = [e for e in extra if e is not None]
    if not present:
        return extra
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(present)))
    given = [g for g in reference if g is not None]
    limit = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(given))) if given else 0.0
    factor = torch.clamp(ratio * limit / (norm + HEAD_CLIP_EPS), max=1.0)
    return [None if e is None else e * factor.to(e.dtype) for e in extra]
