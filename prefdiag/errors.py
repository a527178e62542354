"""The exceptions prefdiag raises; the CLI maps each class to an exit code in one place (cli/_errors.py)."""

from __future__ import annotations


class PrefdiagError(Exception):
    """Base class: a failure prefdiag can explain in one line."""

    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class UsageError(PrefdiagError):
    """An option or argument is invalid (bad value, conflicting flags, unknown metric)."""


class DataError(UsageError):
    """The preference data cannot be read or does not have the expected shape."""


class ModelError(UsageError):
    """A model or tokenizer cannot be loaded or does not fit the run (missing path, vocabulary mismatch)."""


def first_line(exc: BaseException, *, with_type: bool = False) -> str:
    """The first line of an exception's message (its class name when empty), for one-line error reports. A line
    that only announces what follows (``backend='inductor' raised:``) takes the next line with it."""
    text = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    line = text[0] if text else type(exc).__name__
    if line.endswith(":") and len(text) > 1:
        line = f"{line} {text[1]}"
    return f"{type(exc).__name__}: {line}" if with_type and text else line


class RunError(PrefdiagError):
    """Something failed while running on valid input (out of memory at the smallest batch, numerical failure)."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM (a KeyboardInterrupt, so no ``except Exception`` swallows it).
    ``done`` of ``total`` pairs were scored in the pass it stopped; what was scored is in the cache."""

    def __init__(self, signal_number: int, done: int | None = None, total: int | None = None) -> None:
        super().__init__(signal_number, done, total)
        self.signal_number, self.done, self.total = signal_number, done, total

    def __str__(self) -> str:
        if self.done is None or self.total is None:
            return "interrupted"
        return f"interrupted after {self.done} of {self.total} pairs; rerun the same command to resume"
