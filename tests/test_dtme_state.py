"""DTME's state (issue 13's DTME items): bit-exact restore in a fresh process during the analysis,
checkpoints of tensors and primitives only, loads that validate first and change nothing on
failure, checkpoints of other strategies refused, one string with model=, and a failed step that
changes nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from token_models import TinyViT, batch, losses

import mtlopt

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import sys, torch
sys.path[:0] = [{root!r}, {tests!r}]
import mtlopt
from token_models import TinyViT, batch, losses
mode, path = sys.argv[1], sys.argv[2]

def make(seed):
    torch.manual_seed(seed)
    model = TinyViT()
    dtme = mtlopt.create("dtme", model=model, num_tasks=2, analysis_steps=6, covariance_steps=2)
    return model, mtlopt.MTLOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), dtme)

def train(model, opt, start, stop):
    for s in range(start, stop):
        x, y = batch(seed=s)
        opt.zero_grad()
        opt.step(losses(model, x, y))

if mode == "first":
    model, opt = make(0)
    train(model, opt, 0, 4)
    torch.save({{"model": model.state_dict(), "opt": opt.state_dict()}}, path + ".ckpt")
    torch.manual_seed(1234)  # whatever the process does next with the global RNG
    train(model, opt, 4, 9)
else:
    model, opt = make(99)  # a fresh process, another global seed
    saved = torch.load(path + ".ckpt")  # PyTorch's default: weights_only=True
    opt.load_state_dict(saved["opt"])
    model.load_state_dict(saved["model"])
    torch.manual_seed(777)
    train(model, opt, 4, 9)
torch.save([p.detach() for p in model.parameters()], path + "." + mode)
"""


def test_restore_in_a_fresh_process_during_the_analysis_is_bit_exact(tmp_path):
    """Was: task tokens drawn from the global RNG at the expansion, so not bit-exact."""
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests")))
    base = str(tmp_path / "run")
    for mode in ("first", "second"):
        done = subprocess.run(
            [sys.executable, str(script), mode, base], capture_output=True, text=True, cwd=ROOT
        )
        assert done.returncode == 0, done.stderr[-2000:]
    first, second = torch.load(base + ".first"), torch.load(base + ".second")
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def _opt(tasks=2, **kwargs):
    torch.manual_seed(0)
    model = TinyViT(tasks=tasks)
    dtme = mtlopt.create(
        "dtme", model=model, num_tasks=tasks, analysis_steps=6, covariance_steps=2, **kwargs
    )
    return model, mtlopt.MTLOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), dtme)


def _train(model, opt, steps, tasks=2, start=0):
    for s in range(start, start + steps):
        x, y = batch(seed=s, tasks=tasks)
        opt.zero_grad()
        opt.step(losses(model, x, y))


@pytest.mark.parametrize("steps", [1, 3, 7])
def test_checkpoint_loads_with_weights_only(tmp_path, steps):
    """Was: numpy arrays in the analysis state, refused by torch.load(path)'s default."""
    model, opt = _opt()
    _train(model, opt, steps)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    state = torch.load(tmp_path / "opt.pt")  # weights_only=True
    assert state["strategy"]["steps"] == min(steps, 6)


def _snapshot(dtme):
    def freeze(value):
        if isinstance(value, torch.Tensor):
            return value.clone()
        if isinstance(value, dict):
            return {k: freeze(v) for k, v in value.items()}
        if isinstance(value, list):
            return [freeze(v) for v in value]
        return value

    return freeze(dtme.state_dict())


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_failed_load_changes_nothing():
    """Was: a 2-task checkpoint into a 3-task DTME was half-loaded."""
    model, opt = _opt(tasks=2)
    _train(model, opt, 3)
    saved = opt.strategy.state_dict()
    model3, opt3 = _opt(tasks=3)
    _train(model3, opt3, 4, tasks=3)
    before = _snapshot(opt3.strategy)
    with pytest.raises(ValueError, match="2 tasks"):
        opt3.strategy.load_state_dict(saved)
    assert _same(_snapshot(opt3.strategy), before)


def test_checkpoint_of_another_strategy_is_refused():
    _model, opt = _opt()
    pcgrad = mtlopt.create("pcgrad", num_tasks=2)
    with pytest.raises(ValueError, match="not a DTME checkpoint"):
        opt.strategy.load_state_dict(pcgrad.state_dict())
    with pytest.raises(ValueError, match="not a DTME checkpoint"):
        opt.strategy.load_state_dict({"steps": 3, "base": {}, "analysis": None, "plan": None})


def test_one_string_with_model():
    """Was: ValueError: dtme needs num_tasks= (and blocks=)."""
    torch.manual_seed(0)
    model = TinyViT(tasks=3)
    opt = mtlopt.MTLOptimizer(
        torch.optim.SGD(model.parameters(), lr=1e-3),
        "dtme",
        model=model,
        analysis_steps=4,
        covariance_steps=1,
    )
    assert opt.strategy.num_tasks is None
    _train(model, opt, 5, tasks=3)
    assert opt.strategy.num_tasks == 3 and opt.strategy.phase == "expanded"
    assert len(opt.strategy.task_parameters()) == 3


def _poisoned(model, x, y):
    """Finite losses whose gradient is NaN (0 · ∞ through sqrt at 0)."""
    out = losses(model, x, y)
    return [out[0] + torch.sqrt(out[1] * 0.0), out[1]]


@pytest.mark.parametrize("failing_step", [0, 3])
def test_a_failed_step_changes_nothing_in_the_analysis(failing_step):
    """Was: the analysis had already counted the batch when 'nothing was changed' was raised."""
    model, opt = _opt()
    reference_model, reference = _opt()
    _train(model, opt, failing_step)
    _train(reference_model, reference, failing_step)
    before = _snapshot(opt.strategy)
    x, y = batch(seed=50)
    opt.zero_grad()
    with pytest.raises(FloatingPointError, match="nothing was changed"):
        opt.step(_poisoned(model, x, y))
    assert _same(_snapshot(opt.strategy), before)
    _train(model, opt, 6 - failing_step, start=failing_step)
    _train(reference_model, reference, 6 - failing_step, start=failing_step)
    assert opt.strategy.report.range_rates == reference.strategy.report.range_rates
    assert opt.strategy.report.null_rates == reference.strategy.report.null_rates


def test_gradient_accumulation_counts_every_micro_batch_of_a_step():
    model, opt = _opt()
    x, y = batch(seed=0)
    opt.zero_grad()
    opt.backward(losses(model, x, y))
    opt.backward(losses(model, x, y))
    opt.step()
    assert opt.strategy._analysis.covariance.samples == 2 * x.shape[0]
