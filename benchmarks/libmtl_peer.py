"""LibMTL 1.1.5's own implementation of a method, stepping one of our models.

A LibMTL weighting is a mixin of its architecture: it reaches the model through
``get_share_params`` and ``zero_grad_share_params``, computes the per-task gradients itself
(``loss.backward()`` per task, copied into a T×P matrix parameter by parameter) and writes the
combination back into ``.grad``. :class:`LibMTLStep` gives a weighting exactly that host around any
model, so that the suite and the ``perf`` problem run LibMTL's code path on the same model and
batches as ours. LibMTL is optional (``pip install --no-deps libmtl==1.1.5``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

# Our name → LibMTL's class and the ``backward`` arguments matching our defaults.
LIBMTL_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "ew": ("EW", {}),
    "gls": ("GLS", {}),
    "uw": ("UW", {}),
    "rlw": ("RLW", {"dist": "Normal"}),
    "dwa": ("DWA", {"T": 2.0}),
    "graddrop": ("GradDrop", {"leak": 0.0}),
    "mgda": ("MGDA", {"mgda_gn": "none"}),
    "gradnorm": ("GradNorm", {"alpha": 1.5}),
    "imtl": ("IMTL", {}),
    "pcgrad": ("PCGrad", {}),
    "gradvac": ("GradVac", {"beta": 0.5}),
    "cagrad": ("CAGrad", {"calpha": 0.4, "rescale": 1}),
}


def available() -> bool:
    try:
        from mtlopt.interop.libmtl import import_libmtl

        import_libmtl()
    except ImportError:
        return False
    return True


def libmtl_step(
    method: str,
    model: nn.Module,
    shared: Sequence[nn.Parameter],
    num_tasks: int,
    lr: float,
) -> Callable[[list[torch.Tensor]], None]:
    """A ``step(losses)`` running LibMTL's implementation of ``method`` with Adam on ``model``."""
    from mtlopt.interop.libmtl import import_libmtl

    lib = import_libmtl()
    class_name, kwargs = LIBMTL_METHODS[method]
    weighting = getattr(lib.weighting, class_name)

    class LibMTLStep(weighting):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.task_num = num_tasks
            self.task_name = [f"task{i}" for i in range(num_tasks)]
            self.device = torch.device("cpu")
            self.rep_grad = False
            # Epoch 1 with unit initial losses: GradNorm's balancing path (epoch 0 is EW there).
            self.epoch = 1 if class_name == "GradNorm" else 0
            self.train_loss_buffer = np.ones((num_tasks, 2))
            self._shared = list(shared)

        def get_share_params(self):
            return self._shared

        def zero_grad_share_params(self) -> None:
            for p in self._shared:
                if p.grad is not None:
                    p.grad.zero_()

    host = LibMTLStep()
    host.init_param()
    params = [*model.parameters(), *host.parameters()]
    optimizer = torch.optim.Adam(params, lr=lr)

    def step(losses: list[torch.Tensor]) -> None:
        optimizer.zero_grad(set_to_none=False)
        host.backward(torch.stack(losses), **kwargs)
        optimizer.step()

    return step
