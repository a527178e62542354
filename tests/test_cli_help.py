"""Every command's help shows what its source says: bracketed literals survive rich markup, flags show no <bool>,
the usage line names the arguments; -q leaves stderr empty; --revision still works as --reference-revision."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prefdiag.cli import app

runner = CliRunner()
SAMPLE = Path(__file__).parent.parent / "sample_data"
COMMANDS = ["audit", "compare", "gate"]


def _help(command: str) -> str:
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_help_keeps_every_bracketed_literal(command):
    from prefdiag.cli import _options, gate_command, scoring_commands

    sources = "".join(Path(m.__file__).read_text() for m in (_options, gate_command, scoring_commands))
    escaped = set(re.findall(r"\\\\(\[[^\]]+\])", sources))  # every literal the sources escape for rich
    assert {"[gate]", "[tool.prefdiag.gate]"} <= escaped
    text = " ".join(_help(command).split())
    if command != "gate":
        assert "[default: $PREFDIAG_CACHE_DIR or ~/.cache/prefdiag]" in text
        assert "a [gate] table" in text
    assert "[tool.prefdiag.gate]" in text


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_no_bool_metavar_for_flags_and_names_the_arguments(command):
    text = _help(command)
    flags = [line for line in text.splitlines() if "<bool>" in line and "--help" not in line]
    assert flags == []
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    argument = "RUN" if command == "gate" else "DATA"
    assert argument in usage and argument.lower() not in usage  # typer writes a required one as {DATA}
    if command != "gate":
        assert "--reference-revision" in text and "--revision " not in text.replace("--reference-revision", "")


def test_quiet_prints_nothing_but_errors(tmp_path):
    result = runner.invoke(app, ["audit", str(SAMPLE / "pairs.jsonl"), "-q", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0 and result.stderr == ""
    assert (tmp_path / "out" / "summary.json").is_file()


def test_revision_is_still_accepted_as_the_reference_revision(tmp_path):
    import json

    out = tmp_path / "out"
    for flag in ("--revision", "--reference-revision"):
        result = runner.invoke(app, ["audit", str(SAMPLE / "pairs.jsonl"), "-r", str(SAMPLE / "models" / "reference"),
                                     flag, "main", "-q", "-o", str(out), "--device", "cpu"])  # fmt: skip
        assert result.exit_code == 0, result.output
        assert json.loads((out / "summary.json").read_text())["provenance"]["options"]["reference_revision"] == "main"


def test_every_escaped_literal_reaches_some_help():
    from prefdiag.cli import _options, gate_command, scoring_commands

    sources = "".join(Path(m.__file__).read_text() for m in (_options, gate_command, scoring_commands))
    escaped = set(re.findall(r"\\\\(\[[^\]]+\])", sources))
    shown = " ".join(" ".join(_help(command).split()) for command in COMMANDS)
    assert escaped and all(literal in shown for literal in escaped), escaped


@pytest.mark.parametrize("command, argument", [("audit", "DATA"), ("compare", "DATA"), ("clean", "DATA"),
                                               ("gate", "RUN")])  # fmt: skip
def test_usage_line_names_the_argument_without_braces(command, argument):
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    usage = next(line for line in result.stdout.splitlines() if "Usage:" in line)
    assert usage.split()[-1] == argument and "{" not in usage, usage


def test_clean_help_shows_no_bool_metavar_and_is_listed():
    text = _help("clean")
    assert [line for line in text.splitlines() if "<bool>" in line and "--help" not in line] == []
    listed = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert listed.exit_code == 0 and "clean" in listed.stdout
