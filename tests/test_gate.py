"""The release gate through the real CLI: rules from --min/--max, a --gate file and pyproject.toml, exit codes
0/1/2, `prefdiag gate` on a saved run, severities, per-group and baseline metrics, and no torch when gating."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prefdiag import gate
from prefdiag.cli import app
from prefdiag.errors import UsageError

runner = CliRunner()


def invoke(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False, **kwargs)


@pytest.fixture(scope="module")
def run_dir(model_dirs, pairs_file, tmp_path_factory) -> Path:
    """One compare run's --output directory, gated with one passing, one failing and one warning rule."""
    out = tmp_path_factory.mktemp("gated") / "out"
    result = invoke("compare", pairs_file, "-r", model_dirs["llama"], "-p", model_dirs["llama-policy"], "--device",
                    "cpu", "-q", "-o", out, "--min", "ranking_accuracy=0.99", "--max", "mean_dpo_loss=5",
                    "--max", "negative_margin_regime_rate=0:warn")  # fmt: skip
    assert result.exit_code == 1, result.output
    return out


@pytest.fixture(scope="module")
def summary(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_failing_run_still_writes_everything_and_records_each_rule(run_dir, summary):
    assert {p.name for p in run_dir.iterdir()} >= {"pairs.parquet", "summary.json", "report.md", "junit.xml",
                                                   "report.html"}  # fmt: skip
    record = summary["gate"]
    assert record["passed"] is False and record["n_rules"] == 3
    assert record["n_failed"] == 1
    rules = {r["metric"]: r for r in record["rules"]}
    assert set(rules["ranking_accuracy"]) >= {"metric", "op", "threshold", "severity", "observed", "passed"}
    assert rules["ranking_accuracy"] == {**rules["ranking_accuracy"], "op": "min", "threshold": 0.99,
                                        "severity": "error", "passed": False}  # fmt: skip
    assert rules["ranking_accuracy"]["observed"] == pytest.approx(summary["ranking_accuracy"])
    assert rules["mean_dpo_loss"]["passed"] is True
    nmr = rules["negative_margin_regime_rate"]
    assert nmr["severity"] == "warn" and nmr["passed"] is (summary["negative_margin_regime_rate"] <= 0)
    assert list(summary)[-1] == "provenance"


def test_gate_on_the_saved_run_gives_the_run_verdict(run_dir, summary, tmp_path):
    again = invoke("gate", run_dir, "-q")  # no rules given: the ones the run recorded
    assert again.exit_code == 1, again.output
    assert "ranking_accuracy" in again.stdout and "FAIL" in again.stdout
    same = invoke("gate", run_dir / "summary.json", "--min", "ranking_accuracy=0.99", "--max", "mean_dpo_loss=5",
                  "--max", "negative_margin_regime_rate=0:warn", "-f", "json", "-o", tmp_path / "regated", "-q")
    assert same.exit_code == 1
    regated = json.loads(same.stdout)
    key = lambda r: (r["metric"], r["op"])  # noqa: E731
    assert sorted(regated["gate"]["rules"], key=key) == sorted(summary["gate"]["rules"], key=key)
    assert json.loads((tmp_path / "regated" / "summary.json").read_text())["gate"] == regated["gate"]
    assert (tmp_path / "regated" / "pairs.parquet").is_file() and (tmp_path / "regated" / "junit.xml").is_file()


GATE_FILE = {
    "pass": '[gate]\nmin_ranking_accuracy = 0.01\nmax_negative_margin_regime_rate = { value = 0, severity = "warn" }\n',
    "fail": "[gate]\nmin_ranking_accuracy = 0.99\n",
    "invalid": "[gate]\nmin_ranking_acuracy = 0.5\n",
}
PYPROJECT = {k: v.replace("[gate]", "[project]\nname = 'x'\n\n[tool.prefdiag.gate]") for k, v in GATE_FILE.items()}
CLI = {
    "pass": ["--min", "ranking_accuracy=0.01", "--max", "negative_margin_regime_rate=0:warn"],
    "fail": ["--min", "ranking_accuracy=0.99"],
    "invalid": ["--min", "ranking_acuracy=0.5"],
}
EXIT = {"pass": 0, "fail": 1, "invalid": 2}


@pytest.mark.parametrize("outcome", ["pass", "fail", "invalid"])
@pytest.mark.parametrize("source", ["cli", "gate-file", "pyproject"])
def test_exit_codes_for_each_rule_source(run_dir, tmp_path, monkeypatch, source, outcome):
    monkeypatch.chdir(tmp_path)  # no pyproject.toml here unless the case writes one
    args = ["gate", run_dir, "-q"]
    if source == "cli":
        args += CLI[outcome]
    elif source == "gate-file":
        (tmp_path / "release.toml").write_text(GATE_FILE[outcome])
        args += ["--gate", "release.toml"]
    else:
        (tmp_path / "pyproject.toml").write_text(PYPROJECT[outcome])
    result = invoke(*args)
    assert result.exit_code == EXIT[outcome], result.output
    if outcome == "invalid":
        assert "unknown metric 'ranking_acuracy'" in result.stderr and "did you mean ranking_accuracy" in result.stderr
        assert "valid metrics:" in result.stderr and "negative_margin_regime_rate" in result.stderr
    elif outcome == "pass":
        assert "warn" in result.stdout  # the warn rule is reported, without failing the run


def test_compare_exit_codes_from_each_source(model_dirs, pairs_file, tmp_path, monkeypatch):
    base = ["compare", pairs_file, "-r", model_dirs["gpt2"], "-p", model_dirs["gpt2-policy"], "--device", "cpu", "-q"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text(PYPROJECT["fail"])
    assert invoke(*base, "-o", tmp_path / "a").exit_code == 1
    recorded = json.loads((tmp_path / "a" / "summary.json").read_text())["gate"]["rules"]
    assert recorded[0]["source"].startswith("pyproject")
    (tmp_path / "release.toml").write_text(GATE_FILE["pass"])
    assert invoke(*base, "--gate", "release.toml").exit_code == 0  # --gate replaces pyproject.toml
    # the command line overrides a file's rule on the same metric
    assert invoke(*base, "--gate", "release.toml", "--min", "ranking_accuracy=0.99").exit_code == 1
    (tmp_path / "pyproject.toml").write_text(PYPROJECT["invalid"])
    bad = invoke(*base, "-o", tmp_path / "b")
    assert bad.exit_code == 2 and "ranking_acuracy" in bad.stderr
    assert not (tmp_path / "b").exists()  # rejected before any model loaded


def test_audit_rejects_policy_metrics_and_uses_command_tables(model_dirs, pairs_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["audit", pairs_file, "-r", model_dirs["gpt2"], "--device", "cpu", "-q"]
    result = invoke(*base, "--min", "ranking_accuracy=0.5")
    assert result.exit_code == 2 and "not computed by prefdiag audit" in result.stderr
    (tmp_path / "pyproject.toml").write_text(textwrap.dedent("""
        [tool.prefdiag.gate]
        max_truncated_rate = 0.5
        [tool.prefdiag.gate.compare]
        min_ranking_accuracy = 0.99
        [tool.prefdiag.gate.audit]
        min_ref_ranking_accuracy = 0.0
        "max_quantiles.ref_margin.p05" = { value = -1e9, severity = "warn" }
    """))
    result = invoke(*base, "-f", "json")
    assert result.exit_code == 0, result.output
    rules = {r["metric"]: r for r in json.loads(result.stdout)["gate"]["rules"]}
    assert set(rules) == {"truncated_rate", "ref_ranking_accuracy", "quantiles.ref_margin.p05"}
    assert rules["quantiles.ref_margin.p05"]["passed"] is False


@pytest.mark.parametrize(
    "toml,message",
    [
        ("minimum_ranking_accuracy = 0.5", "must be min_<metric> or max_<metric>"),
        ('min_ranking_accuracy = "high"', "must be a number"),
        ("min_ranking_accuracy = true", "must be a number"),
        ('min_ranking_accuracy = { value = 0.5, severity = "fatal" }', "severity must be error or warn"),
        ("min_ranking_accuracy = { value = 0.5, level = 1 }", "a rule table takes value and severity"),
        ("min_ranking_accuracy = ", "invalid TOML"),
        ("max_ranking_accuracy_drop = 0.1", "give --baseline DIR"),
        ("max_groups.math.ranking_accuracy = 0.1", "no per-group metrics"),
    ],
)
def test_invalid_gate_files_exit_2(run_dir, tmp_path, toml, message):
    (tmp_path / "g.toml").write_text(f"[gate]\n{toml}\n")
    result = invoke("gate", run_dir, "--gate", tmp_path / "g.toml", "-q")
    assert result.exit_code == 2, result.output
    assert message in result.stderr and result.stderr.startswith("Error: ")


@pytest.mark.parametrize("spec", ["ranking_accuracy", "ranking_accuracy=", "=0.5", "ranking_accuracy=0.5:fatal",
                                  "ranking_accuracy=nan", "ranking_accuracy=x"])  # fmt: skip
def test_invalid_cli_rules_exit_2(run_dir, spec):
    result = invoke("gate", run_dir, "--min", spec, "-q")
    assert result.exit_code == 2 and result.stderr.startswith("Error: --min")


def test_gate_needs_rules_and_a_summary(tmp_path, monkeypatch, run_dir):
    monkeypatch.chdir(tmp_path)
    assert invoke("gate", tmp_path / "missing").exit_code == 2
    (tmp_path / "empty").mkdir()
    assert "no summary.json" in invoke("gate", tmp_path / "empty").stderr
    bare = {k: v for k, v in json.loads((run_dir / "summary.json").read_text()).items() if k != "gate"}
    (tmp_path / "summary.json").write_text(json.dumps(bare))
    result = invoke("gate", tmp_path / "summary.json")
    assert result.exit_code == 2 and "no gate rules" in result.stderr
    (tmp_path / "bad.json").write_text("{not json")
    assert invoke("gate", tmp_path / "bad.json", "--min", "n_pairs=1").exit_code == 2


def test_step_summary_gets_the_markdown_report(run_dir, tmp_path, monkeypatch):
    target = tmp_path / "step.md"
    target.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(target))
    assert invoke("gate", run_dir, "-q").exit_code == 1
    text = target.read_text()
    assert text.startswith("earlier step\n") and "Gate FAILED" in text and "## Worst" in text


# ------------------------------------------------------------------------------------ library: names and rules

GROUPED = {
    "command": "compare",
    "n_pairs": 4,
    "ranking_accuracy": 0.75,
    "flip_rate": None,
    "quantiles": {"dpo_loss": {"p95": 0.9}},
    "groups": {"column": "source", "values": {"math": {"ranking_accuracy": 0.5, "n_pairs": 2},
                                              "chat.v2": {"ranking_accuracy": 1.0, "n_pairs": 2}}},
}  # fmt: skip


def test_metric_names_cover_nested_and_group_values():
    values = gate.metric_values(GROUPED)
    assert values["ranking_accuracy"] == 0.75 and values["flip_rate"] is None
    assert values["quantiles.dpo_loss.p95"] == 0.9
    assert values["groups.math.ranking_accuracy"] == 0.5 and values["groups.chat.v2.ranking_accuracy"] == 1.0
    assert "command" not in values and "groups.column" not in values


def test_group_rules_and_wildcards():
    rules = gate.rules_from_table(
        {"min_groups": {"math": {"ranking_accuracy": 0.4}}, "min_groups.*.ranking_accuracy": {"value": 0.6,
         "severity": "warn"}}, "test")  # fmt: skip
    assert {r.metric for r in rules} == {"groups.math.ranking_accuracy", "groups.*.ranking_accuracy"}
    record = gate.evaluate(GROUPED, rules)
    observed = {(r["metric"], r["severity"]): r["passed"] for r in record["rules"]}
    assert observed == {("groups.math.ranking_accuracy", "error"): True,
                        ("groups.math.ranking_accuracy", "warn"): False,
                        ("groups.chat.v2.ranking_accuracy", "warn"): True}  # fmt: skip
    assert record["passed"] is True and record["n_warnings"] == 1
    with pytest.raises(UsageError, match="unknown metric 'groups.code.ranking_accuracy'") as info:
        gate.evaluate(GROUPED, [gate.parse_cli_rule("groups.code.ranking_accuracy=0.5", "min")])
    assert "math" in info.value.hint


def test_no_value_fails_and_bounds_are_inclusive_with_float_noise():
    summary = {"command": "compare", "n_pairs": 3, "flip_rate": None, "ranking_accuracy": 0.1 + 0.2}
    record = gate.evaluate(summary, [gate.Rule("flip_rate", "min", 0.0), gate.Rule("ranking_accuracy", "max", 0.3),
                                     gate.Rule("ranking_accuracy", "min", 0.3), gate.Rule("n_pairs", "min", 3)])
    assert [r["passed"] for r in record["rules"]] == [False, True, True, True]


def test_prerun_check_knows_each_mode():
    gate.check_rules([gate.Rule("ref_ranking_accuracy", "min", 0.5)], "reference")
    gate.check_rules([gate.Rule("n_pairs", "min", 1)], "data")
    gate.check_rules([gate.Rule("groups.math.ranking_accuracy", "min", 0.5)], "policy")
    gate.check_rules([gate.Rule("ranking_accuracy_drop", "max", 0.1), gate.Rule("baseline.n_regressed", "max", 0)],
                     "policy", baseline=True)  # fmt: skip
    with pytest.raises(UsageError, match="not computed"):
        gate.check_rules([gate.Rule("ref_ranking_accuracy", "min", 0.5)], "data")
    with pytest.raises(UsageError, match="--baseline"):
        gate.check_rules([gate.Rule("ranking_accuracy_delta", "min", 0)], "policy")


def test_gating_never_imports_torch(run_dir):
    code = f"""
import sys
import prefdiag.gate, prefdiag.baseline, prefdiag.diagnostics
import prefdiag.reports.html, prefdiag.reports.junit, prefdiag.reports.markdown, prefdiag.reports.terminal
from typer.testing import CliRunner
from prefdiag.cli import app
result = CliRunner().invoke(app, ["gate", {str(run_dir)!r}, "-q", "-o", {str(run_dir / "regate")!r}])
assert result.exit_code == 1, result.output
assert "torch" not in sys.modules, "torch was imported"
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_documented_toml_parses_to_the_documented_rules():
    import re
    import tomllib

    doc = (Path(__file__).parent.parent / "docs" / "ci.md").read_text()
    block = re.search(r"```toml\n(.*?)```", doc, re.S).group(1)
    table = tomllib.loads(block)["tool"]["prefdiag"]["gate"]
    rules = {r.metric: r for r in gate.rules_from_table(table, "docs", "compare")}
    assert set(rules) == {"ranking_accuracy", "negative_margin_regime_rate", "ranking_accuracy_drop",
                          "baseline.n_regressed", "groups.*.ranking_accuracy",
                          "groups.math.negative_margin_regime_rate", "reward_accuracy"}  # fmt: skip
    assert rules["negative_margin_regime_rate"].severity == "warn" and rules["ranking_accuracy"].op == "min"
    audit = {r.metric for r in gate.rules_from_table(table, "docs", "audit")}
    assert "ref_ranking_accuracy" in audit and "reward_accuracy" not in audit
    gate.check_rules(rules.values(), "policy", baseline=True)


def test_help_documents_the_gate_options():
    result = runner.invoke(app, ["gate", "--help"])
    assert result.exit_code == 0 and "Example:" in result.stdout and "--baseline" in result.stdout
    for command in ("audit", "compare"):
        text = runner.invoke(app, [command, "--help"], terminal_width=200).stdout
        assert all(option in text for option in ("--min", "--max", "--gate", "--baseline"))
