"""The one place that maps prefdiag's exceptions to exit codes and one-line messages."""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup
from typer.core import _click as click  # typer 0.2x vendors click; its exceptions are these
from typer.exceptions import Abort  # not in typer._click.exceptions

from prefdiag.errors import Interrupted, PrefdiagError, RunError, UsageError, first_line
from prefdiag.interrupt import handle_signals

EXIT_OK, EXIT_GATE_FAILED, EXIT_USAGE, EXIT_RUN_FAILED = 0, 1, 2, 3

EXIT_CODES: list[tuple[type[BaseException], int]] = [
    (UsageError, EXIT_USAGE),  # includes DataError and ModelError
    (RunError, EXIT_RUN_FAILED),
    (PrefdiagError, EXIT_RUN_FAILED),
]


EXIT_INTERRUPTED = 130  # 128 + SIGINT; SIGTERM gives 143


def exit_code_for(exc: BaseException) -> int:
    """Exit code for an exception: 2 for bad usage or input, 3 for anything that failed while running, 128 + the
    signal number for a run stopped by a signal (130 for Ctrl-C)."""
    if isinstance(exc, Interrupted):
        return 128 + exc.signal_number
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return EXIT_RUN_FAILED


def report_error(exc: BaseException) -> int:
    """Print a one-line error (a hint on a second line), the traceback only with PREFDIAG_DEBUG=1; return the code."""
    if getattr(exc, "echoes_another_rank", False) and os.environ.get("RANK", "0") not in ("", "0"):
        return exit_code_for(exc)  # under torchrun: rank 0 prints that another rank failed, once (prefdiag.parallel)
    if os.environ.get("PREFDIAG_DEBUG") == "1":
        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(exc, KeyboardInterrupt):  # Ctrl-C or SIGTERM: not an error, one line saying where it stopped
        print(str(exc) if isinstance(exc, Interrupted) else "interrupted", file=sys.stderr)
        return exit_code_for(exc)
    print(f"Error: {first_line(exc, with_type=not isinstance(exc, PrefdiagError))}", file=sys.stderr)
    hint = getattr(exc, "hint", None)
    if hint:
        print(f"Hint: {hint}", file=sys.stderr)
    if not isinstance(exc, PrefdiagError) and os.environ.get("PREFDIAG_DEBUG") != "1":
        print("Set PREFDIAG_DEBUG=1 to see the traceback.", file=sys.stderr)
    return exit_code_for(exc)


def handles_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn any exception a command raises into a one-line message and the exit code this module assigns it."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with handle_signals():
                return command(*args, **kwargs)
        except typer.Exit:
            raise
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - this is the one catch-all
            raise typer.Exit(report_error(exc)) from None

    return wrapper


class OneLineErrors(TyperGroup):
    """The app's command group: click's own usage errors (a bad choice or type, an unknown option, a missing
    argument) become one line in prefdiag's format, "Error: ...", exit 2, instead of a usage panel."""

    def main(self, args: Any = None, prog_name: Any = None, complete_var: Any = None, standalone_mode: bool = True,
             **extra: Any) -> Any:  # fmt: skip
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:  # `prefdiag` alone: the help, as typer shows it
            from typer import rich_utils

            rich_utils.rich_format_error(exc)
            code = exc.exit_code
        except click.exceptions.ClickException as exc:
            print(f"Error: {' '.join(exc.format_message().split())}", file=sys.stderr)
            code = EXIT_USAGE if isinstance(exc, click.exceptions.UsageError) else exc.exit_code
        except Abort:
            print("interrupted", file=sys.stderr)
            code = EXIT_INTERRUPTED
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


class PlainUsage(TyperCommand):
    """A command whose usage line names a required argument plainly (``DATA``), not as typer 0.29 braces it
    (``{DATA}``), which reads as a literal or a set of choices."""

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument) and param.required:
                pieces.append(param.display_name_raw + ("..." if param.nargs != 1 else ""))
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces
