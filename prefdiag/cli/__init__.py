"""The prefdiag command line: a thin typer layer over prefdiag.api. Heavy imports happen inside commands."""

from __future__ import annotations

import typer

from prefdiag import __version__
from prefdiag.cli import clean_command, gate_command, scoring_commands
from prefdiag.cli._errors import OneLineErrors, PlainUsage

app = typer.Typer(
    name="prefdiag",
    help="Is your DPO checkpoint aligned, or does it only look aligned on the loss curve?\n\n"
    "Exit codes: 0 ran (and any gate passed), 1 a gate failed, 2 bad usage or input, 3 failure while running.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    cls=OneLineErrors,
)
app.command("audit", cls=PlainUsage)(scoring_commands.audit)
app.command("compare", cls=PlainUsage)(scoring_commands.compare)
app.command("gate", cls=PlainUsage)(gate_command.gate)
app.command("clean", cls=PlainUsage)(clean_command.clean)


def _version(value: bool) -> None:
    if value:
        print(f"prefdiag {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    pass


def main() -> None:
    """Console-script entry point."""
    from prefdiag.cpu_threads import passive_openmp_waits  # perf branch: before anything imports torch

    passive_openmp_waits()
    app()
