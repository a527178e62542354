"""The real CLI end to end: audit and compare, files under --output, JSON on stdout, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
from typer.testing import CliRunner

from prefdiag.cli import app

PAIR_COLUMNS = ["pair_id", "prompt_tokens", "chosen_tokens", "rejected_tokens", "ref_chosen_logp",
                "ref_rejected_logp", "ref_margin", "ref_prefers_rejected", "truncated"]
POLICY_COLUMNS = ["policy_chosen_logp", "policy_rejected_logp", "policy_margin", "reward_chosen",
                  "reward_rejected", "reward_margin", "dpo_loss", "negative_margin_regime", "chosen_displaced",
                  "both_displaced"]
SUMMARY_KEYS = ["schema_version", "n_pairs", "beta", "reward_accuracy", "ranking_accuracy", "ref_ranking_accuracy",
                "mean_dpo_loss", "mean_reward_margin", "negative_margin_regime_rate", "chosen_displaced_rate",
                "both_displaced_rate", "ref_prefers_rejected_rate", "truncated_rate", "provenance", "verdict"]

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_compare_writes_table_summary_and_report(model_dirs, pairs_file, tmp_path):
    out = tmp_path / "out"
    result = invoke("compare", pairs_file, "-r", model_dirs["llama"], "-p", model_dirs["llama-policy"],
                    "--device", "cpu", "--output", out, "--beta", "0.2")
    assert result.exit_code == 0, result.output
    assert "negative-margin regime" in result.stdout and "verdict" in result.stdout
    pairs = pd.read_parquet(out / "pairs.parquet")
    summary = json.loads((out / "summary.json").read_text())
    assert set(PAIR_COLUMNS + POLICY_COLUMNS) <= set(pairs.columns)
    assert set(SUMMARY_KEYS) <= set(summary)
    assert pairs["pair_id"].tolist() == [f"q{i:03d}" for i in range(len(pairs))]  # input order, ids kept
    assert summary["n_pairs"] == len(pairs) and summary["beta"] == 0.2
    assert summary["reward_accuracy"] == pytest.approx((pairs["reward_margin"] > 0).mean())
    assert summary["ranking_accuracy"] == pytest.approx((pairs["policy_margin"] > 0).mean())
    nmr = (pairs["reward_margin"] > 0) & (pairs["policy_margin"] < 0)
    assert pairs["negative_margin_regime"].tolist() == nmr.tolist()
    assert summary["negative_margin_regime_rate"] == pytest.approx(nmr.mean())
    assert pairs["reward_margin"].to_numpy() == pytest.approx(
        0.2 * (pairs["policy_margin"] - pairs["ref_margin"]).to_numpy())
    provenance = summary["provenance"]
    assert provenance["reference"]["name"] == str(model_dirs["llama"])
    assert provenance["dataset"]["content_sha256"]
    assert provenance["tokenization"]["scheme"] == "trl-1.x"
    report = (out / "report.md").read_text()
    assert "Verdict" in report and "negative-margin regime" in report


def test_audit_json_on_stdout(model_dirs, pairs_file):
    result = invoke("audit", pairs_file, "--reference", model_dirs["gpt2"], "--device", "cpu", "--format", "json",
                    "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["command"] == "audit" and summary["n_pairs"] == 24
    assert 0 <= summary["ref_ranking_accuracy"] <= 1
    assert "reward_accuracy" not in summary


def test_same_numbers_from_the_cli_in_table_and_json_modes(model_dirs, chat_file, tmp_path):
    a = invoke("compare", chat_file, "-r", model_dirs["qwen"], "-p", model_dirs["qwen-policy"], "--device", "cpu",
               "-f", "json", "-q")
    b = invoke("compare", chat_file, "-r", model_dirs["qwen"], "-p", model_dirs["qwen-policy"], "--device", "cpu",
               "-q", "-o", tmp_path / "o", "--batch-tokens", "64")
    assert a.exit_code == b.exit_code == 0
    first = json.loads(a.stdout)
    second = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert first["mean_dpo_loss"] == pytest.approx(second["mean_dpo_loss"], abs=1e-7)


def test_every_layout_gives_the_same_numbers(model_dirs, chat_file, tmp_path):
    tables = {}
    for layout in ["prefix", "packed", "separate"]:
        out = tmp_path / layout
        result = invoke("compare", chat_file, "-r", model_dirs["qwen"], "-p", model_dirs["qwen-policy"], "--device",
                        "cpu", "-q", "--no-cache", "--layout", layout, "--batch-tokens", "512", "-o", out)
        assert result.exit_code == 0, result.output
        provenance = json.loads((out / "summary.json").read_text())["provenance"]
        assert provenance["reference"]["layout"] == provenance["policy"]["layout"] == layout
        tables[layout] = pd.read_parquet(out / "pairs.parquet")
    columns = ["ref_chosen_logp", "ref_rejected_logp", "policy_chosen_logp", "policy_rejected_logp"]
    for layout in ["packed", "separate"]:
        assert tables[layout][columns].to_numpy() == pytest.approx(tables["prefix"][columns].to_numpy(), rel=1e-5, abs=1e-5)


def test_a_sharded_model_gives_the_same_numbers(model_dirs, pairs_file, tmp_path, monkeypatch):
    """--shard loads with device_map="auto"; on this one-device machine that only checks the plumbing and that
    indices follow the hidden states to whatever device they end on."""
    from prefdiag import models

    shards = []
    original = models.load_model

    def recording(name, **kwargs):
        shards.append(kwargs["shard"])
        return original(name, **kwargs)

    monkeypatch.setattr(models, "load_model", recording)
    tables = []
    for extra in ([], ["--shard"]):
        out = tmp_path / f"out{len(extra)}"
        result = invoke("audit", pairs_file, "-r", model_dirs["llama"], "--device", "cpu", "-q", "--no-cache", "-o", out,
                        *extra)
        assert result.exit_code == 0, result.output
        tables.append(pd.read_parquet(out / "pairs.parquet")[["ref_chosen_logp", "ref_rejected_logp"]].to_numpy())
    assert shards == [False, True]
    assert tables[1] == pytest.approx(tables[0], abs=1e-6)


@pytest.mark.parametrize(
    "args,message",
    [
        (["compare", "missing.jsonl", "-r", "{ref}", "-p", "{pol}"], "missing.jsonl: no such file"),
        (["compare", "{data}", "-r", "{ref}", "-p", "{pol}", "--beta", "-1"], "--beta must be > 0"),
        (["compare", "{data}", "-r", "/nonexistent/model", "-p", "{pol}"], "does not exist"),
        (["audit", "{data}", "-r", "{ref}", "--chosen-column", "answer"], "missing column 'answer'"),
        (["compare", "{data}", "-r", "{ref}", "-p", "{other}"], "vocabulary"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(model_dirs, pairs_file, tmp_path, args, message):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(vocab_size=123, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(other)
    values = {"ref": model_dirs["llama"], "pol": model_dirs["llama-policy"], "data": pairs_file, "other": other}
    out = tmp_path / "out"
    result = invoke(*[a.format(**values) for a in args], "--output", out, "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert result.stderr.startswith("Error: ")
    assert not out.exists() or not any(out.iterdir())


def test_module_entry_point_and_help_for_every_command():
    done = subprocess.run([sys.executable, "-m", "prefdiag", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "compare" in done.stdout
    for command in ("audit", "compare"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "Example:" in result.stdout


def test_progress_covers_tokenization_and_each_scoring_pass(model_dirs, pairs_file):
    from prefdiag import api

    seen: dict[str, list[float]] = {}

    def progress(description, total):
        seen[description] = [total, 0]

        def advance(n):
            seen[description][1] += n

        return advance

    options = api.RunOptions(device="cpu", cache=False)
    api.compare(str(pairs_file), str(model_dirs["llama"]), str(model_dirs["llama-policy"]), options, progress)
    assert seen == {"tokenizing": [24, 24], "scoring reference": [24, 24], "scoring policy": [24, 24]}
