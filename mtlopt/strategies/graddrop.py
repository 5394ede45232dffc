"""GradDrop: gradient sign dropout."""

from __future__ import annotations

import torch
from torch import Tensor

from ..registry import register
from ..wide import column_abs_sum
from .base import Combined, GradientStrategy, Randomized


@register(
    "graddrop",
    kind="gradient",
    cost="T backward",
    stateful=True,
    paper="Chen et al., Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign "
    "Dropout, NeurIPS 2020",
    conventions="leak=0; applied element-wise to whatever J holds (shared parameters, or the shared "
    "features in representation mode as in the paper); sum of the kept gradients; purity "
    "½(1 + Σg/Σ|g|) exactly (½ where Σ|g| = 0), the authors' code divides by 2Σ|g| + 1e-7, which "
    "pulls coordinates with |g| ≲ 1e-7 towards ½; the authors' code rescales the output to the "
    "norm of Σ_i g_i by default (keep_gradnorm_constant=True), the paper does not (our default)",
)
class GradDrop(Randomized, GradientStrategy):
    """GradDrop (Chen et al., 2020, Algorithm 1).

    Per coordinate, the sign purity ``P = ½ (1 + Σ_i g_i / Σ_i |g_i|)``; with ``U ~ Uniform(0, 1)``
    keep the positive task gradients where ``P > U`` and the negative ones where ``P < U``; the
    update is the sum of the kept gradients. ``leak`` (per task, in [0, 1]) lets that fraction of
    every gradient through unmasked.

    Args:
        leak: leak parameter ℓ (default 0).
        seed: seed of the strategy's generator.
        keep_gradnorm_constant: rescale the update to the norm of ``Σ_i g_i``, as the authors'
            code does by default (default False: Algorithm 1 as written).
    """

    _state_attrs = ("_rng_state",)

    def __init__(
        self,
        leak: float = 0.0,
        seed: int | None = None,
        keep_gradnorm_constant: bool = False,
        num_tasks: int | None = None,
    ):
        super().__init__(num_tasks)
        if not 0.0 <= leak <= 1.0:
            raise ValueError(f"leak must lie in [0, 1], got {leak}")
        self.leak = leak
        self.keep_gradnorm_constant = keep_gradnorm_constant
        self._init_rng(seed)

    def hyperparameters(self) -> dict[str, object]:
        return {"leak": self.leak, "keep_gradnorm_constant": self.keep_gradnorm_constant}

    def combine(self, jacobian: Tensor, losses: Tensor | None = None) -> Combined:
        rng, commit = self._step_rng()
        generator = torch.Generator(device=jacobian.device)
        generator.manual_seed(int(rng.integers(0, 2**62)))
        # Column sums of J and of |J| give the sums of the positive and of the negative entries:
        # the update needs nothing else, so no T×P temporary is formed, and the P-vectors are
        # reused in place (each fresh one is a mapping page-faulted anew on the host).
        total = jacobian.sum(dim=0)
        magnitude = column_abs_sum(jacobian)
        purity = torch.div(total, magnitude).nan_to_num_(0.0)  # 0/0 only where the column is 0
        purity.add_(1).mul_(0.5)
        # Drawn in float32 whatever J's dtype: the same seed then drops the same signs in
        # float32 and float64 (and half-precision draws would be too coarse).
        uniform = torch.rand(
            purity.shape, generator=generator, device=jacobian.device, dtype=torch.float32
        )
        # Mask M_ij = leak + (1 − leak)·[sign kept], so Σ_i M_ij J_ij = leak·Σ_i J_ij + (1 − leak)
        # × (the positive entries' sum ½(Σ + Σ|·|) where purity > U, the negative ones'
        # ½(Σ − Σ|·|) where purity < U, neither at a tie): with s = sign(purity − U) that is
        # ½(|s|·Σ + s·Σ|·|), in float arithmetic (boolean masks are several times slower on CPU).
        side = torch.sub(purity, uniform, out=purity).sign_()
        kept = side.abs().mul_(total).addcmul_(side, magnitude).mul_(0.5)
        direction = kept if self.leak == 0.0 else kept.mul_(1 - self.leak).add_(total, alpha=self.leak)
        if self.keep_gradnorm_constant:
            norm = direction.norm()
            direction = torch.where(norm > 0, direction * (total.norm() / norm), direction)
        return Combined(direction=direction, weights=None, commit=commit)
