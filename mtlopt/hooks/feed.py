"""The strategy side of the closure hooks: what a strategy fed by the optimizer declares."""

from __future__ import annotations

from typing import Any, ClassVar


class Fed:
    """Mixin of strategies that need inputs besides ``J`` (other batches' gradients, perturbed
    gradients). The optimizer's ``step`` sets :attr:`feed` for the duration of one backward
    (:func:`mtlopt.hooks.feeding`); a backward without it is refused before anything changes."""

    feed: Any = None
    hook: ClassVar[str] = ""
    info: Any

    def feed_hint(self) -> str:
        """What to pass to ``step`` (the error message of a step without it)."""
        raise NotImplementedError

    def require_feed(self) -> Any:
        if self.feed is None:
            raise TypeError(self.feed_hint())
        return self.feed
