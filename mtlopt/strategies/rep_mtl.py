"""Rep-MTL: regularising the task saliencies ∂L_t/∂z of the shared representation."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from ..registry import register
from ..saliency import RepresentationTap, saliencies
from .base import LossStrategy, Scalarized


@register(
    "rep_mtl",
    kind="structural",
    hooks=("representation",),
    cost="1 backward + T to the features, double backward",
    stateful=False,
    paper="Wang, Li & Xu, Rep-MTL: Unleashing the Power of Representation-level Task Saliency for "
    "Multi-Task Learning, ICCV 2025",
    conventions="no public code: implemented from the paper's description (our reading): TSR = "
    "mean entropy of each task's per-sample saliency distribution over positions (channel-summed "
    "|∂L_t/∂z|, normalised to sum 1); CSA = InfoNCE on the cosines of the samples' whole signed "
    "saliencies across task pairs, same sample positive; "
    "tsr_weight = csa_weight = 0.1, temperature 0.1 (ours); equal weighting of the task losses",
)
class RepMTL(LossStrategy):
    """Rep-MTL (Wang, Li & Xu, ICCV 2025).

    **No public code exists** (the authors' repository announces it); this is our implementation
    of the paper's description, and the exact normalisations are our reading. The task saliency
    is the gradient of a task's loss with respect to the shared representation ``z`` (the output
    of the module given as ``representation``), ``S_t = ∂L_t/∂z``, taken with a graph. Per sample
    ``b``, its channel-summed magnitude ``a_{t,b}(n) = Σ_c |S_t[b, n, c]|`` over the positions
    ``n`` (pixels or tokens) is normalised into a distribution ``p_{t,b} = a_{t,b} / Σ_n a_{t,b}``.
    The objective is::

        L = Σ_t L_t + λ_TSR · mean_{t,b} H(p_{t,b}) + λ_CSA · L_CSA
        H(p) = −Σ_n p(n) log p(n)                      (task-specific saliency regulation)
        L_CSA = mean_{t≠u} mean_b −log softmax_{b'}( cos(S_{t,b}, S_{u,b'}) / τ )_b
                                                        (cross-task saliency alignment)

    with ``S_{t,b}`` sample b's whole saliency (signed, every position and channel). The entropy
    term keeps each task's saliency concentrated (its own patterns sharp, against negative
    transfer); the InfoNCE term makes the same sample's saliencies point the same way across tasks
    (complementary sharing) while samples stay apart. Heads that pool the positions uniformly
    before a linear layer (mean-pooled tokens) give every position the same saliency: the entropy
    term is then constant and only the alignment acts. The regularisers are back-propagated through
    the saliencies, i.e. through the heads (a double backward) and through ``z`` into the trunk.

    Layouts of ``z``: ``[B, D]`` (every feature a position, no channel sum), ``[B, N, C]`` (tokens,
    channels last), ``[B, C, H, W]`` (channels first); ``channel_axis`` overrides the channel axis.

    Usage::

        opt = mtlopt.MTLOptimizer(torch.optim.Adam(model.parameters()), "rep_mtl",
                                  representation=model.encoder)
        opt.step(task_losses(model, batch))     # the forward pass ran through model.encoder

    Args:
        representation: the module whose output is the shared representation ``z`` (a forward hook
            records it).
        tsr_weight: λ_TSR (default 0.1, ours: the paper's value was not available to us).
        csa_weight: λ_CSA (default 0.1, ours).
        temperature: τ of the InfoNCE term (default 0.1, ours).
        channel_axis: the channel axis of ``z`` (default: by rank, as above).
    """

    absent_tasks = (
        "the present tasks' losses and saliencies only (CSA pairs present tasks; with one task "
        "left only its entropy term remains)"
    )
    linear_in_losses: ClassVar[bool] = True

    def __init__(
        self,
        representation: nn.Module | None = None,
        tsr_weight: float = 0.1,
        csa_weight: float = 0.1,
        temperature: float = 0.1,
        channel_axis: int | None = None,
        num_tasks: int | None = None,
    ) -> None:
        super().__init__(num_tasks)
        if tsr_weight < 0 or csa_weight < 0 or not temperature > 0:
            raise ValueError("tsr_weight and csa_weight must be >= 0 and temperature > 0")
        self.tap = None if representation is None else RepresentationTap(representation)
        self.tsr_weight, self.csa_weight = float(tsr_weight), float(csa_weight)
        self.temperature, self.channel_axis = float(temperature), channel_axis

    def hyperparameters(self) -> dict[str, object]:
        return {
            "tsr_weight": self.tsr_weight,
            "csa_weight": self.csa_weight,
            "temperature": self.temperature,
        }

    def scalarize(self, losses: Tensor) -> Scalarized:
        if self.tap is None:
            raise TypeError(
                "rep_mtl needs the shared representation: MTLOptimizer(opt, 'rep_mtl', "
                "representation=model.encoder) (the module whose output the heads read); nothing "
                "was changed"
            )
        z = self.tap.take()
        stacked = saliencies(list(losses), z)
        regulariser = self.tsr_weight * saliency_entropy(saliency_maps(stacked, self.channel_axis))
        if stacked.shape[0] > 1 and self.csa_weight > 0:
            samples = 1 if z.dim() == 1 else z.shape[0]
            per_sample = stacked.reshape(stacked.shape[0], samples, -1)
            regulariser = regulariser + self.csa_weight * cross_task_alignment(
                per_sample, self.temperature
            )
        weights = torch.ones_like(losses)
        return Scalarized(loss=losses.sum() + regulariser.to(losses.dtype), weights=weights)


def saliency_maps(stacked: Tensor, channel_axis: int | None = None) -> Tensor:
    """``[T, B, N]``: per task and sample, the channel-summed saliency magnitude per position."""
    magnitude = stacked.abs()
    rank = stacked.dim() - 1  # the rank of z
    if channel_axis is None:
        channel_axis = {1: None, 2: None, 3: -1, 4: 1}.get(rank, 1)
    if channel_axis is not None:
        axis = channel_axis + 1 if channel_axis >= 0 else channel_axis
        magnitude = magnitude.sum(dim=axis)
    if rank == 1:
        return magnitude.reshape(stacked.shape[0], 1, -1)
    return magnitude.reshape(stacked.shape[0], stacked.shape[1], -1)


def saliency_entropy(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """Mean over tasks and samples of the entropy of each saliency distribution over positions."""
    p = maps / (maps.sum(dim=-1, keepdim=True) + eps)
    return -(p * torch.log(p + eps)).sum(dim=-1).mean()


def cross_task_alignment(saliency: Tensor, temperature: float, eps: float = 1e-12) -> Tensor:
    """InfoNCE over samples for every ordered pair of different tasks (same sample: positive), on
    the cosines of the ``[T, B, ·]`` per-sample saliencies."""
    t, b = saliency.shape[0], saliency.shape[1]
    unit = saliency / (saliency.norm(dim=-1, keepdim=True) + eps)
    logits = torch.einsum("tbn,ucn->tubc", unit, unit) / temperature
    targets = torch.arange(b, device=saliency.device).expand(t, t, b)
    nll = -torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    off_diagonal = ~torch.eye(t, dtype=torch.bool, device=saliency.device)
    return nll[off_diagonal].mean()
