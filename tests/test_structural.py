"""The structural methods (Auto-λ, MOML, Rep-MTL, Recon) need more than their name: stepped without it,
each refuses with an error that says what to pass, and nothing changes."""

from __future__ import annotations

import pytest
import torch
from conftest import SharedTrunkNet, losses_of, make_batch
from strategies_under_test import NEEDS_MORE_THAN_A_NAME

import mtlopt

WHAT_TO_PASS = {
    "auto_lambda": "model=model, validation=",
    "moml": "model=model, validation=",
    "forum": "model=model",
    "rep_mtl": "representation=model.encoder",
    "ntkmtl_sr": "representation=model.encoder",
    "consmtl": "representation=model.encoder",
    "recon": "layers=model.trunk",
}


@pytest.mark.parametrize("name", sorted(NEEDS_MORE_THAN_A_NAME - {"dtme"}))
def test_a_method_stepped_without_what_it_needs_says_what_to_pass(name):
    model = SharedTrunkNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), name)
    x, y = make_batch()
    with pytest.raises(TypeError) as error:
        opt.step(lambda: losses_of(model, x, y))
    assert WHAT_TO_PASS[name] in str(error.value)
    assert "nothing was changed" in str(error.value)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert opt.task_names is None


@pytest.mark.parametrize("name", ["auto_lambda", "moml", "forum"])
def test_a_bilevel_method_refuses_a_model_that_is_not_a_module(name):
    model = SharedTrunkNet()
    with pytest.raises(TypeError, match=r"model must be an nn\.Module, got list"):
        mtlopt.create(name, model=list(model.parameters()))
    assert mtlopt.create(name, model=model).model is model


def test_the_structural_family_is_registered():
    names = {n for n in mtlopt.available() if mtlopt.info(n).kind.value == "structural"}
    assert names >= {"auto_lambda", "moml", "forum", "rep_mtl", "sparse_mtl", "recon",
                     "ntkmtl_sr", "consmtl"}
