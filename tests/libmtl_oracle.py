"""LibMTL 1.1.5 as an independent oracle: import shims and a model builder.

LibMTL is an optional test dependency (``pip install --no-deps libmtl==1.1.5``); tests that use it
skip cleanly without it. Two compatibility shims are needed on torch 2 (see environment.md):
a stub ``torchvision.models.utils`` (LibMTL's ResNet module imports it at package import), and
``zero_grad(set_to_none=False)`` for the shared parameters, because torch 2 sets gradients to
``None`` by default and LibMTL 1.1.5 then fails in ``_reset_grad``.
"""

from __future__ import annotations

import copy
import os
import sys
import types

import pytest
import torch
from torch import nn


def libmtl():
    """The patched ``LibMTL`` package, or skip the calling test."""
    if "torchvision" not in sys.modules:
        stub = types.ModuleType("torchvision")
        models = types.ModuleType("torchvision.models")
        utils = types.ModuleType("torchvision.models.utils")
        utils.load_state_dict_from_url = torch.hub.load_state_dict_from_url
        stub.models, models.utils = models, utils
        sys.modules.update(
            {"torchvision": stub, "torchvision.models": models, "torchvision.models.utils": utils}
        )
    try:
        import LibMTL.architecture
        import LibMTL.weighting
    except ImportError:
        if os.environ.get("MTLOPT_REQUIRE_LIBMTL"):  # CI sets it: these tests must run there
            raise
        pytest.skip("LibMTL 1.1.5 is not installed (pip install --no-deps libmtl==1.1.5)")
    abstract = LibMTL.architecture.abstract_arch.AbsArchitecture
    abstract.zero_grad_share_params = lambda self: self.encoder.zero_grad(set_to_none=False)
    return LibMTL


def build(weighting: str, trunk: nn.Module, heads: nn.ModuleList, rep_grad: bool = False):
    """A LibMTL HPS model with deep copies of ``trunk`` and ``heads`` and the named weighting."""
    return build_with(getattr(libmtl().weighting, weighting), trunk, heads, rep_grad)


def libmtl_losses(model, x, y) -> torch.Tensor:
    out = model(x)
    return torch.stack(
        [((out[f"t{i}"].squeeze(-1) - y[:, i]) ** 2).mean() for i in range(y.shape[1])]
    )


@pytest.fixture
def requires_libmtl():
    libmtl()


def flat_grad(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in module.parameters()])


def build_with(
    weighting_class: type, trunk: nn.Module, heads: nn.ModuleList, rep_grad: bool = False
):
    """A LibMTL HPS model whose weighting is ``weighting_class`` (e.g. ``to_libmtl("pcgrad")``)."""
    lib = libmtl()
    names = [f"t{i}" for i in range(len(heads))]

    class Model(lib.architecture.HPS, weighting_class):
        pass

    trunk = copy.deepcopy(trunk)
    model = Model(
        task_name=names,
        encoder_class=lambda: trunk,
        decoders=nn.ModuleDict({n: copy.deepcopy(h) for n, h in zip(names, heads, strict=True)}),
        rep_grad=rep_grad,
        multi_input=False,
        device=torch.device("cpu"),
    )
    model.init_param()
    return model
