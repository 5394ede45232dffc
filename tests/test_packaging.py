"""What a package index and a new user see: the installed names, metadata, caches, smoke labels."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import mtlopt
from mtlopt_bench.cache import cache_dir
from mtlopt_bench.report import smoke_banner

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_suite_installs_under_the_projects_name_not_as_benchmarks():
    setuptools = PROJECT["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"mtlopt_bench": "benchmarks"}
    assert "benchmarks" not in setuptools["packages"]
    assert PROJECT["project"]["scripts"]["mtlopt-bench"] == "mtlopt_bench.__main__:main"


def test_every_package_folder_is_listed():
    # The package list is explicit (the mapping above needs it): a new subpackage must be added.
    folders = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "mtlopt").rglob("__init__.py")
    }
    assert folders <= set(PROJECT["tool"]["setuptools"]["packages"])


def test_metadata_for_a_package_index():
    project = PROJECT["project"]
    assert project["version"] == mtlopt.__version__
    assert any(c.startswith("License ::") for c in project["classifiers"])
    assert {"Homepage", "Documentation", "Changelog"} <= set(project["urls"])
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## {project['version']}" in changelog and "Versioning" in changelog
    readme = (ROOT / "README.md").read_text()
    for extra in project["optional-dependencies"]:
        assert f"mtlopt[{extra}]" in readme, f"extra {extra!r} is not documented in the README"


def test_caches_go_to_the_user_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("MTLOPT_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "mtlopt"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "mtlopt"
    monkeypatch.setenv("MTLOPT_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    source = (ROOT / "benchmarks" / "qm9.py").read_text()
    assert "bench-results" not in source and "cache_dir()" in source


def test_quick_tables_say_they_are_a_smoke_run():
    quick = [{"quick": True, "steps": 30, "seed": 0}, {"quick": True, "steps": 30, "seed": 0}]
    banner = smoke_banner(quick)
    assert banner is not None and re.search(r"Smoke run.*30 steps, 1 seed\)", banner)
    assert smoke_banner([{"quick": False, "steps": 1000, "seed": s} for s in range(3)]) is None
