"""The strategy catalogue as a Markdown table, generated from the registry's metadata.

python -m mtlopt.catalogue            # print the table
python -m mtlopt.catalogue --write    # refresh it in docs/strategies.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .registry import _lookup, available, info

BEGIN, END = "<!-- catalogue:begin -->", "<!-- catalogue:end -->"


def markdown_table() -> str:
    lines = [
        "| name | kind | cost | stateful | paper | conventions and defaults |",
        "|---|---|---|---|---|---|",
    ]
    for name in available():
        if not _lookup(name).__module__.startswith("mtlopt."):
            continue  # strategies registered by users are not part of the catalogue
        row = info(name).as_row()
        lines.append(
            f"| `{name}` | {row['kind']} | {row['cost']} | {row['stateful']} | {row['paper']} | "
            f"{row['conventions']} |"
        )
    return "\n".join(lines)


def refresh(path: Path) -> bool:
    """Rewrite the table between the markers of ``path``; True if the file changed."""
    text = path.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{markdown_table()}\n{END}{tail}"
    if new != text:
        path.write_text(new)
        return True
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description="The strategy catalogue from the registry")
    parser.add_argument("--write", action="store_true", help="refresh docs/strategies.md")
    args = parser.parse_args()
    if args.write:
        refresh(Path(__file__).resolve().parent.parent / "docs" / "strategies.md")
    else:
        print(markdown_table())


if __name__ == "__main__":
    main()
