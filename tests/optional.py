"""Optional packages: a test module calls ``require("transformers")`` at import. Locally it skips
when the package is missing; with ``MTLOPT_REQUIRE_<NAME>=1`` (set by .ci/run) it fails instead."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def require(module: str) -> ModuleType:
    switch = f"MTLOPT_REQUIRE_{module.upper()}"
    try:
        return importlib.import_module(module)
    except ImportError as missing:
        if os.environ.get(switch):
            raise AssertionError(f"{module} is required ({switch} is set): {missing}") from missing
        pytest.skip(
            f"{module} is not installed (CI installs it and sets {switch})", allow_module_level=True
        )
        raise


@pytest.fixture
def fresh_accelerator_state():
    """Accelerate keeps one process-wide state (precision included): each test starts anew."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
