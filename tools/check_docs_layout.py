"""Build the docs, open the main pages in headless Chromium, screenshot them, and fail when a
table or a code block is wider than the space it has (its end hidden or behind a scrollbar).

    python3 tools/check_docs_layout.py [--out screenshots/] [--width 1280]

Offline: the site is built into a temporary folder and opened from disk. Each page gets a small
script that measures, after layout, every ``table`` and ``pre > code`` of the article: an element
overflows when its content is wider than its box (``scrollWidth > clientWidth``) or when it
reaches past the article's right edge. Chromium's ``--dump-dom`` prints the page with the
measurements; ``--screenshot`` keeps a PNG of each page for people to look at.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [
    "index.html",
    "guide/index.html",
    "which-method/index.html",
    "integrations/index.html",
    "strategies/index.html",
    "dtme/index.html",
    "benchmarks/index.html",
    "perf/index.html",
    "coming-from/index.html",
    "api/index.html",
]
MEASURE = """<script>
window.addEventListener("load", () => {
  const article = document.querySelector("article") || document.body;
  const edge = article.getBoundingClientRect().right + 1;
  const found = [];
  for (const el of article.querySelectorAll("table, pre > code")) {
    const box = el.closest(".md-typeset__scrollwrap") || el;
    const wide = el.scrollWidth > el.clientWidth + 1 || box.scrollWidth > box.clientWidth + 1;
    if (wide || el.getBoundingClientRect().right > edge) {
      const text = (el.tagName === "TABLE" ? el.querySelector("tr") : el).innerText;
      found.push({tag: el.tagName, width: el.scrollWidth, room: box.clientWidth,
                  start: text.replace(/\\s+/g, " ").slice(0, 80)});
    }
  }
  const out = document.createElement("pre");
  out.id = "layout-report";
  out.textContent = JSON.stringify({width: window.innerWidth, overflowing: found});
  document.body.appendChild(out);
});
</script>"""
SHOT_HEIGHT = 5000
"""Screenshots are this tall, so that they show most of a page, not just its top."""
REPORT = re.compile(r'<pre id="layout-report">(.*?)</pre>', re.S)


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit(
        "headless Chromium is needed: apt-get install -y chromium (Debian), then rerun"
    )


def build(site: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"mkdocs build --strict failed:\n{done.stdout}{done.stderr}")


def browse(browser: str, page: Path, width: int, *args: str, height: int = 1000) -> str:
    command = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--allow-file-access-from-files",
        f"--window-size={width},{height}",
        "--virtual-time-budget=5000",
        *args,
        page.as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode:
        raise RuntimeError(f"chromium failed on {page}: {done.stderr[-500:]}")
    return done.stdout


def measure(browser: str, page: Path, width: int) -> list[dict]:
    """The overflowing tables and code blocks of one HTML file (the file gets the script)."""
    html = page.read_text()
    if MEASURE not in html:
        page.write_text(html.replace("</body>", MEASURE + "</body>"))
    match = REPORT.search(browse(browser, page, width, "--dump-dom"))
    if match is None:
        raise RuntimeError(f"{page}: the measuring script did not run")
    return json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))["overflowing"]


def check(out: Path | None, width: int) -> list[str]:
    browser = chromium()
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        build(site)
        for name in PAGES:
            page = site / name
            if not page.exists():
                problems.append(f"{name}: not built")
                continue
            for item in measure(browser, page, width):
                problems.append(
                    f"{name}: {item['tag'].lower()} {item['width']} px wide in {item['room']} px: "
                    f"{item['start']!r}"
                )
            if out is not None:
                out.mkdir(parents=True, exist_ok=True)
                shot = out / (name.replace("/index.html", "").replace(".html", "") + ".png")
                browse(browser, page, width, f"--screenshot={shot}", height=SHOT_HEIGHT)
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for the screenshots")
    parser.add_argument("--width", type=int, default=1280, help="window width in pixels")
    args = parser.parse_args()
    problems = check(args.out, args.width)
    for line in problems:
        print(line)
    pages = len(PAGES)
    print(
        f"docs layout at {args.width} px: {pages} pages, "
        + (f"{len(problems)} overflowing element(s)" if problems else "no overflow")
    )
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
