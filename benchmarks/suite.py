"""Runs (problem, variant, method, seed) combinations, caching each finished run on disk.

Every run is written to ``OUT/runs/<problem>/<variant>/<method>/seed<k>.json`` as soon as it ends,
so an interrupted suite loses nothing already finished and a rerun with more methods only runs
the new ones. A method that fails (a NaN, an unsupported configuration) is recorded with its
error instead of stopping the suite.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import mtlopt

from .problem import Instance, Problem


@dataclass(frozen=True)
class RunSpec:
    problem: str
    variant: Any
    method: str
    seed: int
    steps: int
    quick: bool

    def path(self, out: Path) -> Path:
        return (
            out / "runs" / self.problem / str(self.variant) / self.method / f"seed{self.seed}.json"
        )

    def fingerprint(self, problem: Problem) -> str:
        config = {
            **asdict(self),
            "kwargs": problem.method_kwargs.get(self.method, {}),
            "mtlopt": mtlopt.__version__,
        }
        return hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


LIBMTL_PREFIX = "libmtl:"


def libmtl_method(method: str) -> str | None:
    """Our name of the method a LibMTL run (``libmtl:pcgrad``) implements, else None."""
    return method[len(LIBMTL_PREFIX) :] if method.startswith(LIBMTL_PREFIX) else None


def single_task(method: str) -> int | None:
    """Task index of a single-task baseline run (``stl-3``), else None."""
    return int(method.split("-", 1)[1]) if method.startswith("stl-") else None


def cached(spec: RunSpec, problem: Problem, out: Path) -> dict | None:
    path = spec.path(out)
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    return result if result.get("fingerprint") == spec.fingerprint(problem) else None


def execute(spec: RunSpec, problem: Problem, out: Path) -> dict:
    """Train one run and save its result (atomically)."""
    result: dict[str, Any] = {**asdict(spec), "fingerprint": spec.fingerprint(problem)}
    start = time.perf_counter()
    sampler = _PeakMemory()
    try:
        instance = problem.setup(spec.seed, spec.variant, spec.quick)
        result.update(_train(spec, problem, instance, sampler))
    except Exception as error:  # recorded, not fatal: the suite goes on with the other runs
        result["error"] = f"{type(error).__name__}: {error}"
    finally:
        sampler.stop()
    result["peak_rss_growth_mb"] = sampler.peak_growth_mb
    result["wall_seconds"] = time.perf_counter() - start
    path = spec.path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)
    return result


def _strategy(spec: RunSpec, problem: Problem, instance: Instance, tasks: int):
    if single_task(spec.method) is not None:
        return mtlopt.create("ew")
    kwargs = dict(problem.method_kwargs.get(spec.method, {}))
    if spec.method == "dtme":
        if instance.blocks is None:
            raise ValueError("dtme needs a transformer")
        if instance.plan_batches is not None:  # the paper's protocol: plan at iteration 0
            from mtlopt.tokens import plan_expansion

            model = instance.model
            plan = plan_expansion(
                model,
                instance.plan_batches,
                lambda b: instance.losses(model, b),
                blocks=instance.blocks,
                num_tasks=tasks,
                bootstrap=0,
            )
            return mtlopt.create(
                "dtme", blocks=instance.blocks, model=model, plan=plan, seed=spec.seed, **kwargs
            )
        analysis = min(100, max(3, spec.steps // 3))
        return mtlopt.create(
            "dtme",
            blocks=instance.blocks,
            num_tasks=tasks,
            model=instance.model,
            analysis_steps=analysis,
            covariance_steps=max(1, analysis // 10),
            **kwargs,
        )
    kwargs.update(_structural_kwargs(spec.method, instance, kwargs, spec.steps))
    return mtlopt.create(spec.method, num_tasks=tasks, **kwargs)


def _structural_kwargs(
    method: str, instance: Instance, given: dict[str, Any], steps: int
) -> dict[str, Any]:
    """What the structural methods need from the problem (i18c): Auto-λ, MOML and FORUM the model and a
    validation closure (the problem's validation batches where it has them, else another training
    batch per step), Rep-MTL, NTKMTL-SR and ConsMTL the representation module, Recon the candidate layers (the
    transformer blocks) and an analysis of a third of the run (at most 100 steps, as DTME's)."""
    if method in ("auto_lambda", "moml", "forum") and "validation" not in given:
        model = instance.model
        held_out = getattr(instance, "validation", None)  # the problem's validation batches
        if held_out is not None:
            calls = iter(range(2_000_000))
            return {"model": model, "validation": lambda: held_out(model, next(calls))}
        draws = iter(range(1_000_000, 2_000_000))
        return {
            "model": model,
            "validation": lambda: instance.losses(model, instance.batch(next(draws))),
        }
    if method in ("rep_mtl", "ntkmtl_sr", "consmtl") and "representation" not in given:
        if instance.representation is None:
            raise ValueError(f"{method} needs the problem's representation module")
        return {"representation": instance.representation}
    if method == "recon" and "layers" not in given:
        if instance.blocks is None:
            raise ValueError("recon needs layers to branch")
        return {"layers": list(instance.blocks), "analysis_steps": min(100, max(3, steps // 3))}
    return {}


def _train(spec: RunSpec, problem: Problem, instance: Instance, sampler: _PeakMemory) -> dict:
    model = instance.model
    task = single_task(spec.method)
    tasks = len(instance.losses(model, instance.batch(0)))

    def select(losses: list[torch.Tensor]) -> list[torch.Tensor]:
        return losses if task is None else [losses[task]]

    peer = libmtl_method(spec.method)
    opt = None
    if peer is not None:
        from .libmtl_peer import libmtl_step

        heads = {id(p) for p in getattr(model, "heads", nn.Module()).parameters()}
        shared = [p for p in model.parameters() if id(p) not in heads]
        libmtl = libmtl_step(peer, model, shared, tasks, instance.lr)

        def train_step(batch: Any) -> tuple[torch.Tensor, bool]:
            losses = instance.losses(model, batch)
            libmtl(losses)
            return torch.stack([loss.detach() for loss in losses]), False

    else:
        strategy = _strategy(spec, problem, instance, tasks if task is None else 1)
        opt = mtlopt.MTLOptimizer(torch.optim.Adam(model.parameters(), lr=instance.lr), strategy)
        hooks = strategy.info.hooks
        _signals(opt, hooks, instance, select)
        draws = iter(())

        def closure(batch: Any) -> list[torch.Tensor]:
            # Multi-batch strategies (MoDo, SDMGrad) call the closure once per independent batch:
            # the first call takes the step's batch, the others draw further ones.
            drawn = next(draws, None)
            return select(instance.losses(model, batch if drawn is None else drawn))

        def train_step(batch: Any) -> tuple[torch.Tensor | None, bool]:
            nonlocal draws
            opt.zero_grad()
            if "batches" in hooks:
                extra = [instance.batch(spec.steps * (k + 1) + step_of[0]) for k in range(2)]
                draws = iter([None, *extra])
            info = opt.step(lambda b=batch: closure(b))
            return (None if info is None else info.losses), bool(info is not None and info.skipped)

    every = max(1, spec.steps // 50)
    trace_every = max(1, spec.steps // 400)
    times, curve, trace, skipped = [], [], [], 0
    sampler.start()
    step_of = [0]
    for step in range(spec.steps):
        step_of[0] = step
        batch = instance.batch(step)
        began = time.perf_counter()
        losses, was_skipped = train_step(batch)
        times.append(time.perf_counter() - began)
        skipped += was_skipped
        if losses is not None and (step % every == 0 or step == spec.steps - 1):
            curve.append([step, *(float(v) for v in losses)])
        if instance.trace is not None and (step % trace_every == 0 or step == spec.steps - 1):
            trace.append(instance.trace(model))
    metrics = instance.evaluate(model)
    if task is not None:  # a single-task model only speaks for its own task's metrics
        metrics = {k: v for k, v in metrics.items() if problem.metric_task.get(k) == task}
    warm = times[min(len(times) - 1, max(1, len(times) // 5)) :]
    result = {
        "metrics": metrics,
        "median_step_seconds": statistics.median(warm),
        "curve": curve,
        "trace": trace,
        "skipped_steps": skipped,
    }
    report = getattr(opt.strategy, "report", None) if opt is not None else None
    if report is not None:
        result["dtme_report"] = report.as_dict()
    return result


def _signals(opt: Any, hooks: tuple[str, ...], instance: Instance, select: Any) -> None:
    """Validation signals for the strategies that read one: the problem's validation losses
    (evaluated before every step, in eval mode), and as PIVRG's scores each task's validation loss
    in percent of its first value (higher: the task is behind)."""
    if not {"validation_losses", "scores"} & set(hooks):
        return
    if instance.validation is None:
        raise ValueError("this problem provides no validation batch (Instance.validation)")
    model, calls, first = instance.model, [0], []

    def losses() -> list[float]:
        model.eval()
        with torch.no_grad():
            values = [float(v) for v in select(instance.validation(model, calls[0]))]
        model.train()
        calls[0] += 1
        return values

    def scores() -> list[float]:
        values = losses()
        if not first:
            first.extend(values)
        return [100.0 * v / f if f > 0 else 0.0 for v, f in zip(values, first, strict=True)]

    if "validation_losses" in hooks:
        opt.observe(validation_losses=losses)
    if "scores" in hooks:
        opt.observe(scores=scores)


class _PeakMemory:
    """Peak resident memory growth of this process during a run (sampled every 5 ms on Linux;
    on CUDA, the allocator's peak is used instead). Indicative: memory freed by an earlier run may
    be reused without growing the process."""

    def __init__(self) -> None:
        self.peak_growth_mb: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._base = 0

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return 0

    def start(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._base = self._rss()
        peak = [self._base]

        def sample() -> None:
            while not self._stop.wait(0.005):
                peak[0] = max(peak[0], self._rss())

        self._peak = peak
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        if torch.cuda.is_available():
            self.peak_growth_mb = torch.cuda.max_memory_allocated() / 2**20
        elif self._base:
            self.peak_growth_mb = max(self._peak[0] - self._base, 0) / 2**20
