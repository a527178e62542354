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

stdout = Console()
stderr = Console(stderr=True)


def setup_logging(quiet: bool) -> None:
    """Warnings (and our info lines) to stderr through rich; silence the libraries' own progress bars."""
    level = logging.ERROR if quiet else logging.WARNING
    logging.basicConfig(level=level, handlers=[RichHandler(console=stderr, show_path=False)], force=True, format="%(message)s")
    logging.getLogger("prefdiag").setLevel(logging.ERROR if quiet else logging.INFO)
    # Environment switches rather than imports: `datasets` costs over a second to import and most runs never need it.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


class ProgressBars:
    """A rich progress bar per scoring pass, on stderr; a no-op when quiet."""

    def __init__(self, quiet: bool) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("pairs"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=stderr,
            disable=quiet,
        )

    def __enter__(self) -> "ProgressBars":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress.live.is_started:
            self.progress.stop()

    def __call__(self, description: str, total: int) -> Callable[[float], None]:
        if not self.progress.live.is_started:  # started on the first pass, so a failed load prints nothing
            self.progress.start()
        task = self.progress.add_task(description, total=total)
        return lambda n: self.progress.advance(task, n)


def emit(result, fmt: OutputFormat, top: int) -> None:
    """Print the run's summary on stdout: a rich report, or JSON."""
    from prefdiag.reports.files import dumps_summary
    from prefdiag.reports.terminal import print_report

    if fmt == OutputFormat.json:
        print(dumps_summary(result.summary), end="")
    else:
        print_report(stdout, result.pairs, result.summary, top)


def write_outputs(result, out_dir: Path, table_format: str, top: int) -> list[Path]:
    """Write the per-pair table, summary.json and report.md into out_dir, atomically."""
    from prefdiag.reports.files import dumps_summary, write_atomically, write_table, write_text
    from prefdiag.reports.markdown import render_markdown

    writers = {
        f"pairs.{table_format}": lambda path: write_table(result.pairs, path, table_format),
        "summary.json": write_text(dumps_summary(result.summary)),
        "report.md": write_text(render_markdown(result.pairs, result.summary, top)),
    }
    written = write_atomically(out_dir, writers)
    stderr.print(f"wrote {', '.join(p.name for p in written)} to {out_dir}")
    return written
