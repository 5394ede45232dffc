"""``mtlopt-bench run --problem my_pkg.my_module:problem``: a user's own problem.

The target is a :class:`~mtlopt_bench.problem.Problem`, or a function returning one, named as
``module:attribute`` (importable from the current directory, like ``python -m``) or
``path/to/file.py:attribute``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

from .problem import Problem

CONTRACT = "see the benchmarks page of the docs, section 'Your own problem'"


def load(target: str) -> Problem:
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise SystemExit(
            f"--problem {target!r}: expected module:attribute, e.g. my_pkg.tasks:problem"
        )
    module = _import(module_name)
    try:
        value = getattr(module, attribute)
    except AttributeError:
        raise SystemExit(
            f"--problem {target!r}: {module_name} has no attribute {attribute!r}"
        ) from None
    problem = value if isinstance(value, Problem) else value() if callable(value) else value
    if not isinstance(problem, Problem):
        raise SystemExit(
            f"--problem {target!r} is a {type(problem).__name__}, not a mtlopt_bench.problem.Problem "
            f"(or a function returning one); {CONTRACT}"
        )
    check(problem)
    return problem


def _import(name: str):
    if name.endswith(".py"):
        path = Path(name)
        if not path.exists():
            raise SystemExit(f"--problem: no file {path}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
        return module
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as missing:
        raise SystemExit(
            f"--problem: cannot import {name!r} ({missing}); run from the folder that contains it "
            "or install its package"
        ) from None


def check(problem: Problem) -> None:
    """Fail early, naming the field, when a problem breaks the contract."""
    errors = []
    if not problem.tasks:
        errors.append("tasks is empty")
    if not problem.metrics or not all(isinstance(v, bool) for v in problem.metrics.values()):
        errors.append("metrics must map each metric name to True (lower is better) or False")
    if problem.single_task_baselines and set(problem.metric_task) != set(problem.metrics):
        errors.append(
            "metric_task must name the task of every metric (or set single_task_baselines=False)"
        )
    if any(not 0 <= i < len(problem.tasks) for i in problem.metric_task.values()):
        errors.append("metric_task has a task index outside tasks")
    if not callable(problem.setup):
        errors.append("setup must be a function setup(seed, variant, quick) -> Instance")
    if problem.steps < 1 or problem.quick_steps < 1:
        errors.append("steps and quick_steps must be positive")
    if errors:
        raise SystemExit(f"problem {problem.name!r}: " + "; ".join(errors) + f"; {CONTRACT}")
