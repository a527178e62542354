"""Stopping a run cleanly on SIGINT / SIGTERM: a signal during scoring stops it at the end of the current batch
(what was scored is saved to the cache, so a rerun resumes), a second signal or one outside scoring stops at once.

The CLI installs the handlers (``handle_signals``); the scorer marks where a stop may wait for the batch to end
(``deferred``) and checks after each batch (``check``). Without the handlers (the library in a notebook), Ctrl-C
is Python's own KeyboardInterrupt.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from prefdiag.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _State:
    installed = False
    deferring = 0  # > 0 while a batch may finish before the run stops
    requested: int | None = None  # the signal received while deferring


def _handler(signal_number: int, frame) -> None:
    if _State.deferring and _State.requested is None:
        _State.requested = signal_number  # stop at the end of this batch
        return
    raise Interrupted(signal_number)


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """Install the SIGINT / SIGTERM handlers for the enclosed run (main thread only), restoring the old ones."""
    if threading.current_thread() is not threading.main_thread() or _State.installed:
        yield
        return
    previous = {number: signal.signal(number, _handler) for number in SIGNALS}
    _State.installed, _State.requested = True, None
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        _State.installed, _State.requested, _State.deferring = False, None, 0


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside: a first signal waits for ``check()`` (called after each batch) instead of stopping at once."""
    _State.deferring += 1
    try:
        yield
    finally:
        _State.deferring -= 1


def check(done: int | None = None, total: int | None = None) -> None:
    """Raise Interrupted if a signal came in since the run started (the batch just finished is saved by now)."""
    if _State.requested is not None:
        raise Interrupted(_State.requested, done, total)
