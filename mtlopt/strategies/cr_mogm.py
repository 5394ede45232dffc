"""CR-MOGM: an exponential moving average of any gradient strategy's task weights."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ..registry import register
from ._state import TaskAxes, decode, encode
from ._wrapping import Wrapping, wrapped_strategy
from .base import (
    STRATEGY_KEY,
    Combined,
    GradientStrategy,
    GramianStrategy,
    Strategy,
    chain,
    combine_through_gramian,
)


@register(
    "cr_mogm",
    kind="gradient",
    cost="T backward",
    stateful=True,
    paper="Zhou et al., On the Convergence of Stochastic Multi-Objective Gradient Manipulation "
    "and Beyond, NeurIPS 2022",
    conventions="alpha=0.9 fixed (torchjd's default; the paper's Corollary 1 lets α_k grow toward "
    "1 as the learning rate decays: set .alpha between steps); base='mgda'; the first step "
    "returns the base's weights; only strategies that report task weights (direction = wᵀJ) can "
    "be smoothed",
)
class CRMOGM(Wrapping):
    """CR-MOGM (Zhou et al., 2022): smooth the weights of a stochastic multi-objective gradient
    method by ``λ_k = α λ_{k−1} + (1 − α) λ̂_k`` (``λ̂_k``: the wrapped strategy's weights at step
    k, ``λ_0 = λ̂_1``) and update along ``λ_kᵀ J``. The averaging makes MGDA-type methods, whose
    weights jump with the mini-batch noise, convergent with stochastic gradients.

    ``mtlopt.create("cr_mogm", base="mgda")``; any gradient strategy that reports its task weights
    can be the base, given by name (``base_kwargs`` are its hyperparameters) or as an instance.
    The base's own state (PCGrad's generator, GradVac's targets) is saved with the average.

    Reference code: torchjd's ``CRMOGMWeighting`` (the paper has no public code).

    Args:
        base: the wrapped strategy (default ``"mgda"``).
        alpha: averaging weight α in [0, 1] (default 0.9; 0 returns the base's weights).
        base_kwargs: hyperparameters of a base given by name.
    """

    absent_tasks = (
        "the base's rule on the present rows; an absent task's averaged weight is not advanced"
    )

    _task_state: ClassVar[dict[str, TaskAxes]] = {"lambd": TaskAxes((0,), np.nan)}

    def __init__(
        self,
        base: str | Strategy = "mgda",
        alpha: float = 0.9,
        base_kwargs: dict[str, Any] | None = None,
        num_tasks: int | None = None,
    ):
        super().__init__(num_tasks)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        self.base: GradientStrategy = wrapped_strategy(base, num_tasks, base_kwargs)
        self.alpha = alpha
        self.supports_representation = self.base.supports_representation  # type: ignore[misc]
        self.lambd: np.ndarray | None = None

    def inner(self) -> list[GradientStrategy]:
        return [self.base]

    def hyperparameters(self) -> dict[str, object]:
        return {"base": self.base, "alpha": self.alpha}

    def remap_columns(self, mapping: Tensor) -> None:
        self.base.remap_columns(mapping)

    @property
    def float64_gramian(self) -> bool:
        return bool(getattr(self.base, "float64_gramian", False))

    def serves_gramian_engine(self) -> bool:
        """The Gramian engine takes the steps where it takes the base's: the average is a
        function of the base's weights alone."""
        from ..autogram import engine_serves

        return engine_serves(self.base)

    def combine(self, jacobian: Tensor, losses: Tensor | None = None) -> Combined:
        if self.serves_gramian_engine():
            return combine_through_gramian(self, jacobian, losses)
        combined = self._smoothed(self.base.combine(jacobian, losses), jacobian.dtype)
        assert combined.weights is not None
        combined.direction = combined.weights @ jacobian
        return combined

    def combine_gramian(
        self,
        gramian: np.ndarray,
        losses: Tensor | None,
        dtype: torch.dtype,
        width: int,
        device: torch.device,
    ) -> Combined:
        """The Gramian engine's entry: the base's weights from ``G``, averaged."""
        assert isinstance(self.base, GramianStrategy)
        return self._smoothed(self.base.combine_gramian(gramian, losses, dtype, width, device), dtype)

    def _smoothed(self, inner: Combined, dtype: torch.dtype) -> Combined:
        """``inner`` with its weights replaced by their running average (direction left to the
        caller)."""
        if inner.weights is None:
            raise TypeError(
                f"cr_mogm averages task weights, and {self.base.info.name} reports none (its "
                "update is not a weighted sum of the task gradients); wrap a weighting strategy "
                "(mgda, pcgrad, cagrad, upgrad, ...)"
            )
        fresh = inner.weights.detach().double().cpu().numpy()
        previous = fresh if self.lambd is None else np.where(np.isnan(self.lambd), fresh, self.lambd)
        averaged = self.alpha * previous + (1 - self.alpha) * fresh
        weights = torch.from_numpy(averaged).to(inner.weights.device, dtype)

        def commit() -> None:
            self.lambd = averaged

        head = None if inner.head_weights is None else weights
        return Combined(
            direction=None,
            weights=weights,
            commit=chain(inner.commit, commit),
            gramian=inner.gramian,
            head_weights=head,
        )

    def state_dict(self) -> dict[str, Any]:
        return {STRATEGY_KEY: self.info.name, "lambd": encode(self.lambd), "base": self.base.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._refuse_other_strategy(state)
        if set(state) != {STRATEGY_KEY, "lambd", "base"}:
            raise KeyError(f"cr_mogm state needs lambd and base, got {sorted(state)}")
        lambd = decode(state["lambd"])
        if lambd is not None and self.num_tasks is not None and len(lambd) != self.num_tasks:
            raise ValueError(
                f"cr_mogm state holds weights for {len(lambd)} tasks, this strategy has "
                f"{self.num_tasks}"
            )
        self.base.load_state_dict(state["base"])
        self.lambd = lambd
