"""The headless-Chromium layout check (tools/check_docs_layout.py) flags what it must flag.

CI runs the check itself on the built site (.ci/run); here it is shown a page with one wide code
line, one wide table and one table that fits. Needs Chromium: skipped without it, unless
``MTLOPT_REQUIRE_CHROMIUM`` is set (CI)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import check_docs_layout as layout

PAGE = """<!doctype html><html><body><article style="width: 600px">
<pre><code>{long}</code></pre>
<table><tr>{wide}</tr></table>
<table><tr><td>fits</td><td>too</td></tr></table>
</article></body></html>"""


def test_wide_code_and_tables_are_flagged_and_narrow_ones_are_not(tmp_path):
    if not any(shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")):
        if os.environ.get("MTLOPT_REQUIRE_CHROMIUM"):
            raise AssertionError("Chromium is required (MTLOPT_REQUIRE_CHROMIUM is set)")
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    page = tmp_path / "page.html"
    cells = "".join(f"<td style='white-space: nowrap'>column number {i}</td>" for i in range(20))
    page.write_text(PAGE.format(long="x = 1  # " + "y" * 300, wide=cells))
    found = layout.measure(layout.chromium(), page, 1280)
    assert sorted(item["tag"] for item in found) == ["CODE", "TABLE"]
    by_tag = {item["tag"]: item["start"] for item in found}
    assert by_tag["CODE"].startswith("x = 1") and by_tag["TABLE"].startswith("column number 0")
