"""Hook 3, the validation signal (CoBa, PIVRG): refused without it, recorded by opt.observe, saved
and restored with the optimizer's state, and the weights the papers' equations give, computed here
independently (numpy.polyfit for CoBa's slopes, scipy's least_squares for PIVRG as its code)."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from conftest import SharedTrunkNet, losses_of, make_batch
from scipy.optimize import least_squares

import mtlopt


def _opt(name, model=None, **kwargs):
    model = model or SharedTrunkNet()
    return model, mtlopt.MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), name, **kwargs)


@pytest.mark.parametrize(("name", "signal"), [("coba", "validation_losses"), ("pivrg", "scores")])
def test_a_step_before_any_signal_is_refused_and_changes_nothing(name, signal):
    model, opt = _opt(name)
    before = copy.deepcopy(model.state_dict())
    x, y = make_batch()
    with pytest.raises(TypeError, match=rf"opt.observe\({signal}=...\)"):
        opt.step(losses_of(model, x, y))
    assert opt.task_names is None and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    opt.observe(**{signal: [1.0, 2.0]})
    opt.step(losses_of(model, x, y))


def test_observe_checks_everything_before_recording_anything():
    _, opt = _opt("coba", tasks=["a", "b"])
    with pytest.raises(TypeError, match="coba reads validation_losses; got scores"):
        opt.observe(scores=[1.0, 2.0])
    with pytest.raises(ValueError, match="missing \\['b'\\]"):
        opt.observe(validation_losses={"a": 1.0})
    with pytest.raises(ValueError, match="3 values for 2 tasks"):
        opt.observe(validation_losses=[1.0, 2.0, 3.0])
    with pytest.raises(FloatingPointError):
        opt.observe(validation_losses=[1.0, float("nan")])
    assert opt.strategy.initial is None
    _, plain = _opt("mgda")
    with pytest.raises(TypeError, match="mgda reads no signal"):
        plain.observe(validation_losses=[1.0, 2.0])


def _coba_reference(observed, warmup, history, tau):
    """CoBa (Gong et al., EMNLP 2024, Eqs. 3-9) from the history of observations, step by step."""
    t = len(observed[0])
    first = np.asarray(observed[0])
    values, slopes, max_slopes, weights = [], [], [], np.full(t, 1 / t)
    out = []
    for v in observed[1:]:
        values.append(np.asarray(v) / first)
        window = np.array(values[-history:])  # (n, T)
        if len(values) >= warmup and len(window) >= 2:
            x = np.arange(len(window))
            alpha = np.array([np.polyfit(x, window[:, i], 1)[0] for i in range(t)])
            slopes.append(alpha)
            max_slopes.append(np.polyfit(x, window.max(axis=1), 1)[0])
            recent = np.array(slopes[-history:])  # (n', T)
            n_recent, n_all = len(recent), len(max_slopes)
            rcs = np.exp(t * alpha / np.abs(alpha).sum())
            rcs /= rcs.sum()
            acs = np.exp(-n_recent * alpha / np.abs(recent).sum(axis=0))
            acs /= acs.sum()
            m = np.array(max_slopes)
            df = np.exp(-tau * n_all * m / np.abs(m).sum())
            df = n_all * (df / df.sum())[-1]
            logits = df * rcs + (1 - df) * acs
            weights = np.exp(t * logits) / np.exp(t * logits).sum()
            if (weights < 1 / (10 * t)).any():
                weights = weights * (1 - t / (10 * t)) + 1 / (10 * t)
        out.append(weights.copy())
    return out


def test_coba_weights_follow_the_papers_equations():
    rng = np.random.default_rng(0)
    steps = 12
    decay = np.stack([np.exp(-0.3 * np.arange(steps)), np.exp(-0.05 * np.arange(steps))], 1)
    observed = list(2.0 * decay + 0.05 * rng.random((steps, 2)))
    observed[7] = observed[7] * np.array([1.0, 1.6])  # a bump, so that the slopes move
    model, opt = _opt("coba", warmup=3, history=4, tau=5.0)
    expected = _coba_reference(observed, warmup=3, history=4, tau=5.0)
    x, y = make_batch()
    opt.observe(validation_losses=list(observed[0]))
    for value, weights in zip(observed[1:], expected, strict=True):
        opt.observe(validation_losses=list(value))
        opt.zero_grad()
        info = opt.step(losses_of(model, x, y))
        np.testing.assert_allclose(info.weights.numpy(), weights, rtol=1e-6)  # float32 losses
        if opt.strategy.weights is not None:
            np.testing.assert_allclose(opt.strategy.weights, weights, rtol=1e-10)
    assert not np.allclose(expected[-1], 0.5)


def test_pivrg_solves_its_equation_as_the_authors_least_squares():
    """G α = √(ŵ/α), ŵ = T softmax(s/temp), temp = max((max s − min s)/log 2, 10); the official
    code solves it with scipy.optimize.least_squares from 1/T on α ≥ 0: same inputs, same α."""
    torch.manual_seed(0)
    model = SharedTrunkNet(tasks=3)
    reference = copy.deepcopy(model)
    _, opt = _opt("pivrg", model)
    scores = np.array([5.0, 40.0, 12.0])
    opt.observe(scores=list(scores))
    x, y = make_batch(tasks=3)
    opt.step(losses_of(model, x, y))
    jacobian = []
    for loss in losses_of(reference, x, y):
        grads = torch.autograd.grad(loss, list(reference.trunk.parameters()), retain_graph=True)
        jacobian.append(torch.cat([g.reshape(-1) for g in grads]).double())
    j = torch.stack(jacobian)
    gram = (j @ j.T).numpy()
    temp = max((scores.max() - scores.min()) / np.log(2.0), 10.0)
    preference = 3 * np.exp(scores / temp) / np.exp(scores / temp).sum()
    solved = least_squares(
        lambda a: gram @ a - np.sqrt(preference / a), np.full(3, 1 / 3), bounds=(0, np.inf),
        xtol=1e-15, ftol=1e-15, gtol=1e-15,
    ).x  # fmt: skip
    np.testing.assert_allclose(opt.last_step.weights.numpy(), solved, rtol=1e-5)
    step = (reference.trunk[0].weight - model.trunk[0].weight).reshape(-1) / 0.1
    expected = (torch.from_numpy(solved) @ j)[: step.numel()]
    torch.testing.assert_close(step.double(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("name", "signal"), [("coba", "validation_losses"), ("pivrg", "scores")])
def test_the_signal_is_saved_with_the_state_and_restored(name, signal):
    kwargs = {"warmup": 2, "history": 3} if name == "coba" else {}
    model, opt = _opt(name, **kwargs)
    for k in range(5):
        opt.observe(**{signal: [1.0 + k, 2.0 / (k + 1)]})
        opt.zero_grad()
        opt.step(losses_of(model, *make_batch(seed=k)))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer)  # weights_only=True: the signal is stored as tensors
    other, fresh = _opt(name, **kwargs)
    fresh.load_state_dict(saved)
    assert repr(fresh.strategy.state_dict()) == repr(opt.strategy.state_dict())
    fresh.step(losses_of(other, *make_batch()))  # no observe needed after loading


def test_a_function_is_called_before_every_step():
    model, opt = _opt("coba")
    calls = []

    def validation():
        calls.append(1)
        return [float(v) for v in losses_of(model, *make_batch(seed=99))]

    opt.observe(validation_losses=validation)
    for k in range(3):
        opt.zero_grad()
        opt.step(lambda k=k: losses_of(model, *make_batch(seed=k)))
    assert len(calls) == 3 and opt.strategy.observations == 2


def test_pivrg_weighs_the_present_tasks_and_keeps_an_absent_tasks_score():
    model = SharedTrunkNet(tasks=3)
    _, opt = _opt("pivrg", model, tasks=["a", "b", "c"])
    opt.observe(scores={"a": 1.0, "b": 30.0, "c": 2.0})
    x, y = make_batch(tasks=3)
    a, _, c = losses_of(model, x, y)
    info = opt.step({"a": a, "b": None, "c": c})
    assert np.isnan(float(info.weights[1])) and np.isfinite(info.weights[[0, 2]].numpy()).all()
    np.testing.assert_array_equal(opt.strategy.scores, [1.0, 30.0, 2.0])
