"""``mtlopt-bench run --problem module:attribute`` and the paired comparison with EW."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mtlopt_bench import __main__ as cli
from mtlopt_bench.paired import NOT_DISTINGUISHABLE, versus_ew

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_the_example_problem_outside_the_package_runs_with_paired_statistics(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(ROOT)  # examples/ is importable from the repository root, as in the README
    argv = ["run", "--problem", "examples.two_regressions:problem", "--methods", "ew,pcgrad,uw"]
    assert cli.main([*argv, "--seeds", "3", "--steps", "6", "--out", str(tmp_path)]) == 0
    folder = tmp_path / "two_regressions"
    rows = {r["method"]: r for r in json.loads((folder / "results.json").read_text())["rows"]}
    assert set(rows) == {"ew", "pcgrad", "uw"} and "vs_ew" not in rows["ew"]
    for method in ("pcgrad", "uw"):
        versus = rows[method]["vs_ew"]
        assert versus["seeds"] == 3 and versus["low"] <= versus["mean"] <= versus["high"]
    text = (folder / "results.md").read_text()
    assert "Paired with EW" in text and "Δm %" in text  # single-task baselines ran too
    assert (folder / "results.csv").read_text().splitlines()[0].endswith("vs_ew_verdict")


def test_paired_interval_is_the_student_t_interval_of_the_differences():
    # Differences 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.3027 → half-width 4.3027 / √3 = 2.4842.
    v = versus_ew([1.0, 2.0, 3.0])
    assert (v.mean, v.seeds) == (2.0, 3)
    assert v.low == pytest.approx(2 - 2.48418, abs=1e-4) and v.high == pytest.approx(
        4.48418, abs=1e-4
    )
    assert v.verdict == NOT_DISTINGUISHABLE
    assert versus_ew([-3.0, -3.2, -2.8]).verdict == "better than EW"
    assert versus_ew([3.0, 3.2, 2.8]).verdict == "worse than EW"
    single = versus_ew([1.5])
    assert single.seeds == 1 and math.isnan(single.low) and "no interval" in single.verdict
    assert versus_ew([]) is None


def test_a_target_that_is_not_a_problem_is_refused_with_the_contract(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit, match=r"not a mtlopt_bench\.problem\.Problem"):
        cli.main(["run", "--problem", "examples.two_regressions:SharedMLP", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="expected module:attribute"):
        cli.main(["run", "--problem", "examples.two_regressions", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="cannot import"):
        cli.main(["run", "--problem", "no_such_module:problem", "--out", str(tmp_path)])


def test_a_broken_contract_names_the_field(tmp_path):
    from examples.two_regressions import problem
    from mtlopt_bench.user_problem import check

    broken = type(problem)(**{**problem.__dict__, "metrics": {"a MSE": "lower"}})
    with pytest.raises(SystemExit, match="metrics must map"):
        check(broken)
