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
            TextColumn("pairs"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=stderr,
            disable=quiet,
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

    def __call__(self, description: str, total: int) -> Callable[[float], None]:
        if not self.progress.live.is_started:  # started by the first bar: a run that fails before prints nothing
            self.progress.start()
        task = self.progress.add_task(description, total=total)
        return lambda n: self.progress.advance(task, n)


def emit(pairs, summary: dict[str, Any], fmt: OutputFormat, top: int) -> None:
    """Print the run's summary on stdout: a rich report, or JSON."""
    from prefdiag.reports.files import dumps_summary
    from prefdiag.reports.terminal import print_report

    if fmt == OutputFormat.json:
        print(dumps_summary(summary), end="")
    else:
        print_report(stdout, pairs, summary, top)


def write_outputs(pairs, summary: dict[str, Any], out_dir: Path, table_format: str | None, top: int) -> list[Path]:
    """Write the per-pair table (unless table_format is None), summary.json, report.md, junit.xml and report.html
    into out_dir, atomically."""
    from prefdiag.reports.files import dumps_summary, write_atomically, write_table, write_text
    from prefdiag.reports.html import render_html
    from prefdiag.reports.junit import render_junit
    from prefdiag.reports.markdown import render_markdown

    writers = {}
    if pairs is not None and table_format is not None:
        writers[f"pairs.{table_format}"] = lambda path: write_table(pairs, path, table_format)
    writers.update(
        {
            "summary.json": write_text(dumps_summary(summary)),
            "report.md": write_text(render_markdown(pairs, summary, top)),
            "junit.xml": write_text(render_junit(summary)),
            "report.html": write_text(render_html(pairs, summary, top)),
        }
    )
    written = write_atomically(out_dir, writers)
    stderr.print(f"wrote {', '.join(p.name for p in written)} to {out_dir}", highlight=False, soft_wrap=True)
    return written


def append_step_summary(pairs, summary: dict[str, Any], top: int) -> None:
    """Append report.md to $GITHUB_STEP_SUMMARY when GitHub Actions sets it (a write failure only warns)."""
    target = os.environ.get("GITHUB_STEP_SUMMARY")
    if not target:
        return
    from prefdiag.reports.markdown import render_markdown

    try:
        with open(target, "a", encoding="utf-8") as handle:
            handle.write(render_markdown(pairs, summary, top) + "\n")
    except OSError as exc:
        logging.getLogger("prefdiag").warning("could not append to GITHUB_STEP_SUMMARY (%s): %s", target, exc)
