"""A per-item time limit for Python-level work, enforced with a real-time interval timer.

Only a main thread can receive signals, so this limit is active in pool workers (which score in
their main thread) and in single-process scoring from a main thread; elsewhere it is a no-op. It
cannot interrupt a long C call (a huge integer power, say): the pool's parent process enforces the
same limit from outside by killing and replacing the worker.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class ItemTimeout(BaseException):
    """Raised inside the scored code when its time is up. A BaseException so that the broad
    `except Exception` blocks in math-verify and sympy do not swallow it."""


def _raise_timeout(signum, frame):
    raise ItemTimeout


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise ItemTimeout in the body after `seconds` of wall time (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGALRM, _raise_timeout)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            signal.signal(signal.SIGALRM, previous)
