"""Progress of long work, from the data path up to whoever shows it: the one way progress climbs the layers.

The code that does the work (embedding, index builds) takes a `ProgressFactory` from its caller (the CLI's bars
or lines, nothing in a Celery task) and reports through `stage(...)`: a `Stage` that counts and notes. Only this
module calls the factory and what it yields, so progress crosses up from the data path to the CLI at the three
lines marked below and nowhere else (README, "Layout").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

Update = Callable[[int], None]
"""What a factory yields: `update(n)` advances by n; it may also have `.note(text)` (a status shown after it)."""
ProgressFactory = Callable[[str, int, str, int], AbstractContextManager[Update]]
"""(description, total, unit, initial) -> a context manager yielding an update callable (e.g. a tqdm bar)."""


class _Silent:
    def __call__(self, n: int) -> None:
        pass

    def note(self, text: str) -> None:
        pass


def no_progress(desc: str, total: int, unit: str = "", initial: int = 0) -> AbstractContextManager[Update]:
    """A ProgressFactory that shows nothing."""
    return nullcontext(_Silent())


class Stage:
    """One stage of work as the data path sees it: `advance(n)` and `note(text)`."""

    def __init__(self, update: Update):
        self._update = update

    def advance(self, n: int) -> None:
        if n:
            self._update(n)  # climb: the CLI's bar or line

    def note(self, text: str) -> None:
        note = getattr(self._update, "note", None)
        if note is not None:
            note(text)  # climb: the CLI's status text

    __call__ = advance  # a Stage is an update callable too (handed to code that takes one)


@contextmanager
def stage(progress: ProgressFactory, desc: str, total: int, unit: str = "", initial: int = 0) -> Iterator[Stage]:
    """A stage of `total` units named `desc`, `initial` of them done before it started."""
    with progress(desc, total, unit, initial) as update:  # climb: the CLI's factory
        yield Stage(update)
