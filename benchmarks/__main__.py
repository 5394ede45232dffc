"""``mtlopt-bench``: until the full suite lands, runs the two-task example."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from .example import main as example_main

    return example_main(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
