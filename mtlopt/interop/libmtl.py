"""LibMTL ⇄ mtlopt: run a LibMTL weighting as an mtlopt strategy, or an mtlopt strategy in LibMTL.

``from_libmtl("PCGrad")`` wraps a LibMTL weighting class so that :class:`~mtlopt.MTLOptimizer` (or
``aggregate(J)``) can use it: gradient weightings receive our Jacobian instead of computing their
own, loss weightings are differentiated once to read their effective task weights.

``to_libmtl("nash_mtl")`` returns a LibMTL ``AbsWeighting`` subclass, to be combined with a LibMTL
architecture the usual way (``class Model(HPS, to_libmtl("nash_mtl")): ...``).

LibMTL itself is optional: ``pip install --no-deps libmtl==1.1.5`` (see the docs for the two
compatibility shims it needs on torch 2, which :func:`import_libmtl` applies).
"""

from __future__ import annotations

import sys
import types
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..registry import Cost, Kind, StrategyInfo, create
from ..strategies.base import Combined, GradientStrategy, LossStrategy, Scalarized

LIBMTL_LOSS_WEIGHTINGS = {"EW", "GLS", "UW", "RLW", "DWA"}


def import_libmtl() -> Any:
    """Import LibMTL 1.1.5 with the shims it needs on torch 2 (a ``torchvision.models.utils`` stub
    and ``zero_grad(set_to_none=False)`` for shared parameters)."""
    if "torchvision" not in sys.modules:
        stub = types.ModuleType("torchvision")
        models = types.ModuleType("torchvision.models")
        utils = types.ModuleType("torchvision.models.utils")
        utils.load_state_dict_from_url = torch.hub.load_state_dict_from_url  # type: ignore[attr-defined]
        stub.models, models.utils = models, utils  # type: ignore[attr-defined]
        sys.modules.update(
            {"torchvision": stub, "torchvision.models": models, "torchvision.models.utils": utils}
        )
    try:
        import LibMTL.architecture
        import LibMTL.weighting
    except ImportError as error:
        raise ImportError("LibMTL is not installed: pip install --no-deps libmtl==1.1.5") from error
    arch = LibMTL.architecture.abstract_arch.AbsArchitecture
    arch.zero_grad_share_params = lambda self: self.encoder.zero_grad(set_to_none=False)
    return LibMTL


class _Host:
    """What a LibMTL weighting expects to find on ``self`` (normally the architecture)."""

    def __init__(self, num_tasks: int, device: torch.device) -> None:
        self.task_num = num_tasks
        self.task_name = [f"task{i}" for i in range(num_tasks)]
        self.device = device
        self.rep_grad = False
        self.epoch = 0
        self.train_loss_buffer = np.zeros((num_tasks, 1))


def from_libmtl(name: str, num_tasks: int, **kwargs: Any) -> GradientStrategy | LossStrategy:
    """A LibMTL 1.1.5 weighting (class name, e.g. ``"PCGrad"``) as an mtlopt strategy.

    ``kwargs`` are passed to the weighting's ``backward`` as LibMTL does (e.g. ``calpha=0.5,
    rescale=1`` for CAGrad, ``mgda_gn="none"`` for MGDA, ``dist="Normal"`` for RLW).
    """
    lib = import_libmtl()
    weighting = getattr(lib.weighting, name)
    if name in LIBMTL_LOSS_WEIGHTINGS:
        return _LibMTLLossStrategy(weighting, num_tasks, kwargs)
    return _LibMTLGradientStrategy(weighting, num_tasks, kwargs)


def _instance(weighting: type, num_tasks: int, device: torch.device, jacobian: Tensor | None):
    captured: dict[str, Tensor] = {}

    class Adapted(weighting):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            torch.nn.Module.__init__(self)
            for key, value in vars(_Host(num_tasks, device)).items():
                setattr(self, key, value)

        def _compute_grad_dim(self) -> None:
            self.grad_dim = jacobian.shape[1] if jacobian is not None else 0

        def _compute_grad(self, losses: Tensor, mode: str, rep_grad: bool = False) -> Tensor:
            return jacobian.clone()  # type: ignore[union-attr]

        def _get_grads(self, losses: Tensor, mode: str = "backward") -> Tensor:
            self._compute_grad_dim()
            return jacobian.clone()  # type: ignore[union-attr]

        def _reset_grad(self, new_grads: Tensor) -> None:
            captured["direction"] = new_grads.detach().clone()

        def get_share_params(self) -> list[Tensor]:
            return []

        def zero_grad_share_params(self) -> None:
            return None

    instance = Adapted()
    instance.init_param()
    return instance, captured


class _LibMTLGradientStrategy(GradientStrategy):
    info = StrategyInfo("libmtl", Kind.GRADIENT, Cost.T_BACKWARD, True, "LibMTL 1.1.5 weighting")
    supports_representation = False

    def __init__(self, weighting: type, num_tasks: int, kwargs: dict[str, Any]) -> None:
        super().__init__(num_tasks)
        self.weighting, self.kwargs = weighting, kwargs
        self.info = StrategyInfo(
            f"libmtl:{weighting.__name__}", Kind.GRADIENT, Cost.T_BACKWARD, True, "LibMTL 1.1.5"
        )
        self._instance: Any = None

    def combine(self, jacobian: Tensor, losses: Tensor | None = None) -> Combined:
        if losses is None:
            losses = torch.ones(jacobian.shape[0], dtype=jacobian.dtype, device=jacobian.device)
        instance, captured = _instance(self.weighting, jacobian.shape[0], jacobian.device, jacobian)
        if self._instance is not None:  # carry LibMTL's own state (GradVac's ρ, GradNorm's scale)
            instance.__dict__.update(
                {k: v for k, v in self._instance.__dict__.items() if k not in ("_modules",)}
            )
            instance._parameters = self._instance._parameters
        weights = instance.backward(losses.detach().to(jacobian.dtype), **self.kwargs)
        direction = captured.get("direction")
        if direction is None:
            raise RuntimeError(f"{self.info.name} did not produce a gradient")

        def commit() -> None:
            self._instance = instance

        w = None if weights is None else torch.as_tensor(np.asarray(weights), dtype=jacobian.dtype)
        return Combined(direction=direction.to(jacobian), weights=w, commit=commit)


class _LibMTLLossStrategy(LossStrategy):
    def __init__(self, weighting: type, num_tasks: int, kwargs: dict[str, Any]) -> None:
        super().__init__(num_tasks)
        self.weighting, self.kwargs = weighting, kwargs
        self.info = StrategyInfo(
            f"libmtl:{weighting.__name__}", Kind.LOSS, Cost.ONE_BACKWARD, True, "LibMTL 1.1.5"
        )
        self._instance, _ = _instance(weighting, num_tasks, torch.device("cpu"), None)

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self._instance.parameters())

    def scalarize(self, losses: Tensor) -> Scalarized:
        """LibMTL calls ``backward()`` itself: run it on a detached leaf to read the weights
        ``∂loss/∂L_i`` (its own parameters, such as UW's, receive their gradient on the way)."""
        leaf = losses.detach().clone().requires_grad_(True)
        self._instance.device = losses.device
        self._instance.backward(leaf, **self.kwargs)
        weights = leaf.grad.detach()
        return Scalarized(loss=weights @ losses, weights=weights)


def to_libmtl(name: str, **kwargs: Any) -> type:
    """An mtlopt strategy as a LibMTL ``AbsWeighting`` subclass (parameter-gradient mode for
    gradient strategies, as LibMTL's own ``backward`` mode; representation mode when the
    architecture was built with ``rep_grad=True``)."""
    lib = import_libmtl()
    base = lib.weighting.abstract_weighting.AbsWeighting

    class MTLOptWeighting(base):  # type: ignore[misc, valid-type]
        def init_param(self) -> None:
            self.mtlopt_strategy = create(name, num_tasks=self.task_num, **kwargs)
            for i, parameter in enumerate(self.mtlopt_strategy.parameters()):
                self.register_parameter(f"mtlopt_param{i}", parameter)

        def backward(self, losses: Tensor, **_: Any) -> np.ndarray | None:
            strategy = self.mtlopt_strategy
            if isinstance(strategy, LossStrategy):
                result = strategy.scalarize(losses)
                result.loss.backward()
                result.commit()
                return result.weights.detach().cpu().numpy()
            if self.rep_grad:
                per_grads, grads = self._get_grads(losses, mode="backward")
                flat = per_grads.reshape(self.task_num, -1)
                combined = strategy.combine(flat, losses.detach())
                self.rep.backward(combined.direction.view_as(per_grads[0]))
            else:
                grads = self._get_grads(losses, mode="backward")
                combined = strategy.combine(grads, losses.detach())
                self._reset_grad(combined.direction)
            combined.commit()
            return None if combined.weights is None else combined.weights.cpu().numpy()

    MTLOptWeighting.__name__ = f"MTLOpt_{name}"
    return MTLOptWeighting
