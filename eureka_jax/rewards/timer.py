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


# After the limit the alarm repeats at this interval until the body has left: Python drops an
# exception raised while a finaliser (__del__, a weakref callback) runs, and regex and sympy
# objects are finalised all the time, so a single alarm can be lost (seen: a 0.5 s limit that let
# an item run for 3.7 s).
_REPEAT_S = 0.05


def _raise_timeout(signum, frame):
    raise ItemTimeout


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise ItemTimeout in the body after `seconds` of wall time (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGALRM, _raise_timeout)
    signal.setitimer(signal.ITIMER_REAL, seconds, _REPEAT_S)
    try:
        yield
    finally:
        # A repeat may land here, before the timer is off: disarm until it is, so that neither
        # this block nor the caller's handler is interrupted, and the previous handler (by
        # default: terminate the process) never sees a pending alarm.
        while True:
            try:
                signal.setitimer(signal.ITIMER_REAL, 0)
                break
            except ItemTimeout:
                continue
        signal.signal(signal.SIGALRM, previous)
