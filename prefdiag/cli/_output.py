"""Everything a command shows or writes: progress on stderr, the report on stdout, files under --output."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from prefdiag.cli._options import OutputFormat
from prefdiag.phases import phase

stdout = Console()
stderr = Console(stderr=True)


def setup_logging(quiet: bool) -> None:
    """Warnings (and our info lines) to stderr through rich; silence the libraries' own progress bars."""
    with phase("cli_setup"):
        _setup_logging(quiet)


def other_rank() -> bool:
    """True on a process other than rank 0 under torchrun / accelerate launch: it prints nothing but errors."""
    return os.environ.get("RANK", "0") not in ("", "0")


def _setup_logging(quiet: bool) -> None:
    quiet = quiet or other_rank()
    level = logging.ERROR if quiet else logging.WARNING
    handler = RichHandler(console=stderr, show_path=False)
    logging.basicConfig(level=level, handlers=[handler], force=True, format="%(message)s")
    logging.getLogger("prefdiag").setLevel(logging.ERROR if quiet else logging.INFO)
    # Environment switches rather than imports: `datasets` costs over a second to import and most runs never need it.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


class ProgressBars:
    """A rich progress bar for tokenization and each scoring pass, on stderr; a no-op when quiet."""

    def __init__(self, quiet: bool) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=stderr,
            disable=quiet or other_rank(),
        )

    def __enter__(self) -> "ProgressBars":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if not self.progress.live.is_started:
            return
        if exc_type is None:
            self.progress.stop()
            return
        # A failed run shows its one-line error, not half-filled bars above it: erase them, print nothing more.
        self.progress.live.transient = True
        console = self.progress.console
        quiet, console.quiet = console.quiet, not console.is_terminal
        try:
            self.progress.stop()
        finally:
            console.quiet = quiet

    def __call__(self, description: str, total: int, unit: str = "pairs") -> Callable[[float], None]:
        if not self.progress.live.is_started:  # started by the first bar: a run that fails before prints nothing
            self.progress.start()
        task = self.progress.add_task(description, total=total, unit=unit)
        return lambda n: self.progress.advance(task, n)


def emit(pairs, summary: dict[str, Any], fmt: OutputFormat, top: int, gate_only: bool = False) -> None:
    """Print the run's summary on stdout: a rich report (with ``gate_only``, the gate table and the verdict
    alone, as `prefdiag gate` shows a re-gated run), or JSON."""
    from prefdiag.reports.files import dumps_summary
    from prefdiag.reports import terminal

    with phase("print_report"):
        if fmt == OutputFormat.json:
            print(dumps_summary(summary), end="")
        elif gate_only:
            _print_gate_and_verdict(summary)
        else:
            terminal.print_report(stdout, pairs, summary, top)
            for note in summary.get("tokenization_notes") or ():
                stdout.print(f"note: {note}", highlight=False, markup=False)


def _print_gate_and_verdict(summary: dict[str, Any]) -> None:
    """What `prefdiag gate` prints: the verdict, the gate table and the gate's one-line outcome."""
    from rich.text import Text

    from prefdiag.reports import terminal
    from prefdiag.reports.common import gate_headline

    stdout.print(terminal.verdict_panel(summary))
    table = terminal.gate_table(summary)
    if table is not None:
        stdout.print(table)
    level, headline = gate_headline(summary)
    stdout.print(Text(headline, style=f"bold {terminal.LEVEL_STYLES[level]}"))


def write(result, out_dir: Path, table_format: str | None, top: int, quiet: bool = False) -> list[Path]:
    """Write the run's files into out_dir (RunResult.write) and say so on stderr (unless quiet)."""
    written = result.write(out_dir, table_format, top)
    if not quiet:
        stderr.print(f"wrote {', '.join(p.name for p in written)} to {out_dir}", highlight=False, soft_wrap=True)
    return written
