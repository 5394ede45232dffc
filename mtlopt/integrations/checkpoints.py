"""Loading a strategy's state with ``torch.load(weights_only=True)``, as frameworks do."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch


def numpy_globals() -> list[Any]:
    """What ``torch.load(weights_only=True)`` needs to rebuild the numpy arrays and scalars some
    strategies keep in their state (use with ``torch.serialization.safe_globals``)."""
    import numpy as np

    core = np._core if hasattr(np, "_core") else np.core
    dtypes = [type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32, np.bool_)]
    return [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype, *dtypes]


def numpy_allowed() -> AbstractContextManager[None]:
    """A context in which ``torch.load(weights_only=True)`` rebuilds those numpy values, e.g.
    around ``accelerator.load_state(path)``."""
    return torch.serialization.safe_globals(numpy_globals())


def allow_numpy_in_checkpoints() -> None:
    """Allow those numpy values for the rest of the process (for frameworks that load checkpoints
    themselves, such as Lightning's ``fit(ckpt_path=...)``)."""
    torch.serialization.add_safe_globals(numpy_globals())
