"""Where the suite keeps derived data (parsed datasets): ``$MTLOPT_CACHE`` if set, else
``$XDG_CACHE_HOME/mtlopt``, else ``~/.cache/mtlopt``. Results stay in ``--out``; caches are
large (QM9 parsed is about 80 MB) and reusable across result folders."""

from __future__ import annotations

import os
from pathlib import Path

ENV = "MTLOPT_CACHE"


def cache_dir() -> Path:
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "mtlopt"
