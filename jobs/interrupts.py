"""Ctrl-C around steps that must finish together: after a version is swapped in, its retention and the run's
records are written before an interrupt is let through, so the run is recorded as what it is (published)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class InterruptedAfterPublish(KeyboardInterrupt):
    """Ctrl-C arrived once the run had published: the version is complete and current, nothing is to resume."""

    def __init__(self, report):
        super().__init__(f"interrupted after publishing {report.version}")
        self.report = report


class Hold:
    """Holds SIGINT from `start()` to the end of its `held()` block, then raises the KeyboardInterrupt it held.
    Only the main thread receives signals; elsewhere it holds nothing."""

    def __init__(self):
        self._previous = None
        self.arrived = False

    def start(self) -> None:
        if self._previous is not None or threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGINT)
        if previous is None or previous is signal.SIG_IGN:  # set outside Python, or ignored (`cmd &`): leave it
            return
        self._previous = previous
        signal.signal(signal.SIGINT, self._hold)

    def _hold(self, signum, frame) -> None:
        self.arrived = True

    def stop(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


@contextmanager
def held() -> Iterator[Hold]:
    """A block whose `Hold` may be started part-way (just before a swap); an interrupt held until the block ends
    is raised then, unless the block is already raising."""
    hold = Hold()
    try:
        yield hold
    finally:
        hold.stop()
    if hold.arrived:
        raise KeyboardInterrupt
