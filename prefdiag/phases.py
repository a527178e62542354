"""Named phases of a run (load_data, tokenize, score, write_outputs...), announced to listeners: the seam a
benchmark or a profiler uses to time a run without reaching inside prefdiag.

    from prefdiag import phases

    def timer(name):                    # returns a context manager entered for the phase's duration
        return my_stopwatch(name)

    remove = phases.add_listener(timer)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import ContextManager

Listener = Callable[[str], ContextManager[object]]

_listeners: list[Listener] = []

# The phases a run goes through, in order (a phase may repeat, once per model).
NAMES = (
    "cli_setup", "load_data", "model_free_checks", "load_tokenizer", "tokenize", "cache_io", "model_identity",
    "load_model", "score", "diagnostics", "write_outputs", "print_report",
)  # fmt: skip


def add_listener(listener: Listener) -> Callable[[], None]:
    """Call ``listener(name)`` around every phase (it returns a context manager); returns a function removing it."""
    _listeners.append(listener)
    return lambda: _listeners.remove(listener)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Mark the enclosed code as the phase ``name`` (one of NAMES) for every listener (nothing happens when there is
    none)."""
    if name not in NAMES:
        raise ValueError(f"unknown phase {name!r}; the phases are: {', '.join(NAMES)}")
    if not _listeners:
        yield
        return
    with contextlib.ExitStack() as stack:
        for listener in list(_listeners):
            stack.enter_context(listener(name))
        yield
