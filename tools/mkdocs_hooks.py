"""mkdocs hooks: docstrings written for Sphinx use roles (:func:`x`, :meth:`y`) that mkdocstrings
leaves as text; the rendered pages show the code without the role."""

from __future__ import annotations

import re

ROLE = re.compile(r":(?:func|meth|class|mod|data|attr|obj|exc|const):(<code>|`)")


def on_page_content(html: str, **_: object) -> str:
    return ROLE.sub(r"\1", html)
