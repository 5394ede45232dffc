"""Every ``python`` code block of the docs runs as written (page by page, in one namespace), and
the site builds with ``mkdocs build --strict`` when mkdocs is installed. A page whose examples need
optional packages says so in its first line, ``<!-- requires: transformers lightning -->``: its
examples skip where those are missing, unless CI's ``MTLOPT_REQUIRE_<NAME>`` switches are set."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from optional import require

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").glob("*.md"))
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
REQUIRES = re.compile(r"<!-- requires: ([\w ]+) -->")
LINK = re.compile(r"\]\(([^)\s]+)\)")
WITH_EXAMPLES = [p for p in PAGES if BLOCK.search(p.read_text())]


@pytest.mark.parametrize("page", WITH_EXAMPLES, ids=lambda p: p.name)
def test_page_examples_run(page, tmp_path, monkeypatch):
    text = page.read_text()
    needs = REQUIRES.search(text)
    for module in needs.group(1).split() if needs else []:
        require(module)
    blocks = BLOCK.findall(text)
    monkeypatch.chdir(tmp_path)  # examples that write files (plots) write them here
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for number, code in enumerate(blocks):
        try:
            exec(compile(code, f"{page.name}[block {number}]", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"{page.name}, example {number} failed:\n{code}") from error


def test_docs_link_only_to_files_in_the_repository():
    for page in PAGES:
        text = page.read_text()
        assert "shared/reference" not in text, f"{page.name} points outside the repository"
        prose = re.sub(r"`[^`\n]*`", "", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M))
        for target in LINK.findall(prose):
            if target.startswith(("http://", "https://", "#", "mailto:")):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            assert ROOT / "docs" in path.parents or path.parent == ROOT / "docs", (
                page.name,
                target,
            )
            assert path.exists(), f"{page.name} links to {target}, which does not exist"


def test_every_page_is_in_the_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in PAGES:
        assert page.name in nav, f"{page.name} is not in mkdocs.yml's nav"


@pytest.mark.skipif(
    shutil.which("mkdocs") is None and not os.environ.get("MTLOPT_REQUIRE_DOCS"),
    reason="mkdocs is not installed (pip install -e '.[docs]')",
)
def test_site_builds_strictly(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
