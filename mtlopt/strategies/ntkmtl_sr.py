"""NTKMTL-SR: NTKMTL's task weights from the shared representation's per-sample gradients."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from ..registry import register
from ..saliency import RepresentationTap, first_order_saliencies
from .base import LossStrategy, Scalarized


@register(
    "ntkmtl_sr",
    kind="structural",
    hooks=("representation",),
    cost="1 backward + T to the features",
    stateful=False,
    paper="Qin et al., NTKMTL: Mitigating Task Imbalance in Multi-Task Learning from Neural "
    "Tangent Kernel Perspective, NeurIPS 2025 (NTKMTL-SR)",
    conventions="the authors' NTKMTL-SR code path (commented out in methods/weight_methods.py): "
    "K_t = J_t J_tᵀ with row b of J_t the gradient of sample b's loss with respect to the whole "
    "representation; ntk_exp = 0.5; no ×T and no clipping on this path; per-sample gradients "
    "read from the mean loss's (heads that treat samples independently, losses that are means "
    "over the batch); a task whose loss does not reach z gets weight 0",
)
class NTKMTLSR(LossStrategy):
    """NTKMTL-SR (Qin et al., NeurIPS 2025), the shared-representation approximation of NTKMTL.

    NTKMTL balances the tasks' convergence speeds through the largest eigenvalue of each task's
    NTK. NTKMTL-SR takes the kernel on the shared representation ``z`` (the output of the module
    given as ``representation``) instead of the parameters: with ``J_t`` the ``B × |z|`` matrix
    whose row ``b`` is ``∂ℓ_{b,t}/∂z`` (sample ``b``'s loss of task ``t``), ``K_t = J_t J_tᵀ`` and
    ``λ_t = λ_max(K_t)``::

        w_t = (Σ_s λ_s / λ_t)^{ntk_exp},        L = Σ_t w_t · mean_b ℓ_{b,t}

    with ``w`` detached: one backward of ``L`` trains the model, plus ``T`` first-order backward
    passes from the losses to ``z`` for the weights (no gradient of the shared parameters per
    task, which is what makes it cheap next to ``ntkmtl``).

    When the heads treat the samples independently (sample ``b``'s output depends on ``z_b``
    only), row ``b`` of ``J_t`` is zero outside ``z_b``, ``K_t`` is diagonal and
    ``λ_t = max_b ‖∂ℓ_{b,t}/∂z_b‖²``. mtlopt reads these per-sample gradients from the gradient of
    the task's loss ``L_t = mean_b ℓ_{b,t}`` with respect to ``z`` (row ``b`` is
    ``∂ℓ_{b,t}/∂z_b / B``; the factor ``B²`` cancels in the ratios), so no per-sample losses are
    needed. Two conditions: heads must not mix samples (no BatchNorm or attention across the
    batch in a head), and every task's loss must be the mean (or every one the sum) over the
    batch. Dimension 0 of ``z`` is the batch; a 1-D ``z`` is one sample (then
    ``λ_t = ‖∂L_t/∂z‖²``, ``ntkmtl``'s weights on the representation).

    Reference code: jianke0604/NTKMTL, ``methods/weight_methods.py``, the NTKMTL-SR path left
    commented out in ``NTKMTL.get_weighted_loss`` (per-sample ``autograd.grad`` to the
    representation, ``torch.linalg.eigvalsh`` of ``J Jᵀ``, the weighted mean losses). The paper's
    parameter-space form is ``ntkmtl``.

    Usage::

        opt = mtlopt.MTLOptimizer(torch.optim.Adam(model.parameters()), "ntkmtl_sr",
                                  representation=model.encoder)
        opt.step(task_losses(model, batch))     # the forward pass ran through model.encoder

    Args:
        representation: the module whose output is the shared representation ``z`` (a forward hook
            records it).
        ntk_exp: exponent of the eigenvalue ratio (default 0.5, the authors' value).
    """

    absent_tasks = "the present tasks: Σ_s λ_s runs over the present tasks"
    linear_in_losses: ClassVar[bool] = True

    def __init__(
        self, representation: nn.Module | None = None, ntk_exp: float = 0.5,
        num_tasks: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__(num_tasks)
        if not ntk_exp >= 0:
            raise ValueError(f"ntk_exp must be non-negative, got {ntk_exp}")
        self.tap = None if representation is None else RepresentationTap(representation)
        self.ntk_exp = float(ntk_exp)

    def hyperparameters(self) -> dict[str, object]:
        return {"ntk_exp": self.ntk_exp}

    def scalarize(self, losses: Tensor) -> Scalarized:
        if self.tap is None:
            raise TypeError(
                "ntkmtl_sr needs the shared representation: MTLOptimizer(opt, 'ntkmtl_sr', "
                "representation=model.encoder) (the module whose output the heads read); nothing "
                "was changed"
            )
        z = self.tap.take()
        weights = ntk_weights(first_order_saliencies(list(losses), z), self.ntk_exp)
        weights = weights.to(losses)
        return Scalarized(loss=weights @ losses, weights=weights)


def ntk_weights(saliency: Tensor, exponent: float) -> Tensor:
    """``(Σ_s λ_s / λ_t)^exponent`` from ``[T, B, ...]`` gradients of the task losses with respect
    to the representation: ``λ_t`` is the largest per-sample squared norm (the largest eigenvalue
    of the diagonal per-sample kernel); a task with ``λ_t = 0`` gets weight 0."""
    samples = 1 if saliency.dim() == 2 else saliency.shape[1]  # a 1-D z is one sample
    per_sample = saliency.detach().double().reshape(saliency.shape[0], samples, -1)
    largest = per_sample.pow(2).sum(dim=-1).amax(dim=-1)
    positive = largest > 0
    ratio = torch.where(positive, largest.sum() / torch.where(positive, largest, 1.0), 0.0)
    return ratio.pow(exponent) * positive
