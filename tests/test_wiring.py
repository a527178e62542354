"""What phase 1 built, reached through the library and the real CLI: CHES from the reference pass (exact, cached,
switchable), the chat-template / compat / binarize options, `prefdiag clean`, `prefdiag gate`'s short output, the
usage lines, one-line errors for click's Abort, options defined once, and the summary schema check itself."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
from conftest import CHATML, invalid_summaries, make_conversations, make_pairs
from oracle import full_ches
from typer.testing import CliRunner

from prefdiag import api
from prefdiag.cli import app
from prefdiag.options import RunOptions

runner = CliRunner()
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                           "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}}]
TOOLS_TEMPLATE = "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}" + CHATML


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def cpu_options(tmp_path: Path, **kwargs) -> RunOptions:
    return RunOptions(device="cpu", dtype="float32", batch_tokens=256, cache_dir=str(tmp_path / "cache"), **kwargs)


def oracle_ches(model_dir: Path, path: Path) -> np.ndarray:
    """(ches, ches_norm) per pair from unbatched fp32 forwards of the pairs tokenized as TRL does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefdiag.tokenization import tokenize_pairs

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    tokenized = tokenize_pairs(tokenizer, [r["prompt"] for r in rows], [r["chosen"] for r in rows],
                               [r["rejected"] for r in rows])  # fmt: skip
    return np.array([full_ches(model, tokenized.prompt_ids[i], tokenized.chosen_ids[i], tokenized.rejected_ids[i])
                     for i in range(len(tokenized))])  # fmt: skip


# -- CHES ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["prefix", "packed", "separate"])
def test_ches_through_audit_equals_the_fp32_oracle_in_every_layout_and_after_a_cache_hit(
    model_dirs, pairs_file, tmp_path, layout
):
    expected = oracle_ches(model_dirs["llama"], pairs_file)
    options = cpu_options(tmp_path, layout=layout)
    for run in ("cold", "warm"):
        result = api.audit(str(pairs_file), str(model_dirs["llama"]), options)
        table = result.pairs
        np.testing.assert_allclose(table["ches"].to_numpy(float), expected[:, 0], rtol=1e-4, err_msg=run)
        np.testing.assert_allclose(table["ches_norm"].to_numpy(float), expected[:, 1], rtol=1e-4, err_msg=run)
        from_cache = result.summary["provenance"]["reference"]["pairs_from_cache"]
        assert from_cache == (len(table) if run == "warm" else 0), run
    assert table["high_ches"].sum() == result.summary["n_high_ches"] >= 1
    assert result.summary["n_ches"] == len(table) and result.summary["high_ches_top_share"] == 0.05
    columns = list(table.columns)
    assert columns.index("ref_prefers_rejected") < columns.index("ches") < columns.index("high_ches")


def test_a_cache_without_ches_is_a_miss_and_no_ches_needs_no_ches(model_dirs, pairs_file, tmp_path):
    reference = str(model_dirs["gpt2"])
    first = api.audit(str(pairs_file), reference, cpu_options(tmp_path, ches=False))
    assert "ches" not in first.pairs.columns and "n_ches" not in first.summary
    second = api.audit(str(pairs_file), reference, cpu_options(tmp_path))  # CHES wanted: the cache lacks it
    assert second.summary["provenance"]["reference"]["pairs_from_cache"] == 0
    assert second.pairs["ches"].notna().all()
    np.testing.assert_array_equal(first.pairs["ref_margin"], second.pairs["ref_margin"])
    third = api.audit(str(pairs_file), reference, cpu_options(tmp_path, ches=False))
    assert third.summary["provenance"]["reference"]["pairs_from_cache"] == len(third.pairs)


def test_ches_columns_and_keys_through_the_cli_and_the_share_option(model_dirs, pairs_file, tmp_path):
    out = tmp_path / "out"
    args = ["compare", pairs_file, "-r", model_dirs["llama"], "-p", model_dirs["llama-policy"], "--device", "cpu"]
    result = invoke(*args, "--high-ches-share", "0.5", "-o", out, "-q")
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(out / "pairs.parquet")
    summary = json.loads((out / "summary.json").read_text())
    assert {"ches", "ches_norm", "ches_percentile", "ches_norm_percentile", "high_ches"} <= set(table.columns)
    assert int(table["high_ches"].sum()) == summary["n_high_ches"] == len(table) // 2
    assert summary["high_ches_top_share"] == 0.5 and summary["provenance"]["options"]["high_ches_share"] == 0.5
    assert "high_ches" in summary["pair_examples"]
    assert "high CHES" in (out / "report.md").read_text()
    result = invoke(*args, "--no-ches", "-o", tmp_path / "off", "-q")
    assert result.exit_code == 0, result.output
    assert "ches" not in pd.read_parquet(tmp_path / "off" / "pairs.parquet").columns
    assert "n_ches" not in json.loads((tmp_path / "off" / "summary.json").read_text())
    for share in ("1.5", "-0.1", "nan"):
        result = invoke(*args, "--high-ches-share", share, "-o", tmp_path / "bad")
        assert result.exit_code == 2 and result.stderr.splitlines() == [
            f"Error: --high-ches-share must be between 0 and 1, got {float(share)}"], result.output
    assert not (tmp_path / "bad").exists()


# -- tokenization options ----------------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_tools_column_reaches_the_chat_template(model_dirs, tmp_path):
    template = tmp_path / "tools.jinja"
    template.write_text(TOOLS_TEMPLATE)
    rows = make_conversations(6)
    plain = write_jsonl(tmp_path / "plain.jsonl", rows)
    with_tools = write_jsonl(tmp_path / "tools.jsonl", [dict(r, tools=TOOLS if i % 2 else None)
                                                       for i, r in enumerate(rows)])  # fmt: skip
    prompt_tokens = {}
    for name, path in (("plain", plain), ("tools", with_tools)):
        out = tmp_path / name
        result = invoke("audit", path, "-r", model_dirs["qwen"], "--chat-template", template, "--device", "cpu",
                        "-o", out, "-q")  # fmt: skip
        assert result.exit_code == 0, result.output
        prompt_tokens[name] = pd.read_parquet(out / "pairs.parquet")["prompt_tokens"].to_numpy()
    grew = prompt_tokens["tools"] > prompt_tokens["plain"]
    assert grew.tolist() == [i % 2 == 1 for i in range(6)]
    settings = json.loads((tmp_path / "tools" / "summary.json").read_text())["provenance"]["tokenization"]
    assert settings["rows_with_tools"] == 3


def test_chat_template_gives_a_tokenizer_without_one_a_template(model_dirs, chat_file, tmp_path):
    args = ["audit", chat_file, "-r", model_dirs["llama"], "--device", "cpu"]
    refused = invoke(*args)
    assert refused.exit_code == 2 and "no chat template" in refused.stderr.splitlines()[0]
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    result = invoke(*args, "--chat-template", template, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    tokenization = summary["provenance"]["tokenization"]
    assert tokenization["chat_template_sha256"] == hashlib.sha256(CHATML.encode()).hexdigest()
    assert summary["provenance"]["options"]["chat_template"] == str(template)
    missing = invoke(*args, "--chat-template", tmp_path / "none.jinja")
    assert missing.exit_code == 2 and "none.jinja" in missing.stderr.splitlines()[0]


def test_an_in_memory_tokenizer_keeps_its_own_template(model_dirs, chat_file, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dirs["qwen"])
    template = tmp_path / "other.jinja"
    template.write_text("{# other #}" + CHATML)
    result = api.audit(str(chat_file), str(model_dirs["qwen"]), cpu_options(tmp_path, chat_template=str(template)),
                       tokenizer=tokenizer)  # fmt: skip
    assert tokenizer.chat_template == CHATML
    assert result.summary["provenance"]["tokenization"]["chat_template_sha256"] == hashlib.sha256(
        template.read_bytes()).hexdigest()


def test_compat_trl0_changes_the_scheme_and_max_prompt_length_applies(model_dirs, pairs_file, tmp_path):
    args = ["audit", pairs_file, "-r", model_dirs["llama"], "--device", "cpu", "-q"]
    runs = {}
    for name, extra in (("trl1", []), ("trl0", ["--compat", "trl0"]),
                        ("short", ["--compat", "trl0", "--max-prompt-length", "3"])):  # fmt: skip
        result = invoke(*args, *extra, "-o", tmp_path / name)
        assert result.exit_code == 0, result.output
        runs[name] = (json.loads((tmp_path / name / "summary.json").read_text()),
                      pd.read_parquet(tmp_path / name / "pairs.parquet"))  # fmt: skip
    assert runs["trl1"][0]["provenance"]["tokenization"]["scheme"] == "trl-1.x"
    assert runs["trl0"][0]["provenance"]["tokenization"]["scheme"] == "trl-0.x"
    assert runs["short"][0]["provenance"]["tokenization"]["max_prompt_length"] == 3
    assert runs["short"][1]["prompt_tokens"].max() <= 3 < runs["trl0"][1]["prompt_tokens"].max()
    bad = invoke(*args, "--compat", "trl2")
    assert bad.exit_code == 2 and len(bad.stderr.splitlines()) == 1 and "trl2" in bad.stderr


def test_max_prompt_length_with_trl1_is_refused_before_anything_loads(tmp_path):
    result = invoke("audit", tmp_path / "missing.jsonl", "-r", tmp_path / "no-model", "--max-prompt-length", "8")
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == ["Error: --max-prompt-length must be a positive number of tokens, and applies "
                                          "to --compat trl0 and rewardbench only (TRL 1.x has no prompt limit); got 8 "
                                          "with trl1"]  # fmt: skip


def test_pairs_over_trl_default_max_length_are_counted_and_noted(model_dirs, tmp_path):
    rows = make_pairs(3)
    rows[1]["chosen"] = " " + " ".join(["the cat is very happy and the dog is sad"] * 120) + "."
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    out = tmp_path / "out"
    result = invoke("audit", data, "-r", model_dirs["llama"], "--device", "cpu", "-o", out)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_over_trl_default_max_length"] == 1
    [note] = summary["tokenization_notes"]
    assert "1 pair exceeds 1024 tokens" in note and "--max-length 1024" in note
    assert f"note: {note}" in " ".join(result.stdout.split())
    capped = invoke("audit", data, "-r", model_dirs["llama"], "--device", "cpu", "--max-length", "1024", "-f", "json",
                    "-o", tmp_path / "capped")  # fmt: skip
    assert capped.exit_code == 0, capped.output
    summary = json.loads(capped.stdout)
    assert json.loads((tmp_path / "capped" / "summary.json").read_text()) == summary
    assert summary["n_over_trl_default_max_length"] is None and summary["tokenization_notes"] == []


def rated_file(tmp_path: Path) -> Path:
    completions = [{"model": "m", "response": f" answer {k}.", "overall_score": float(k)} for k in range(6)]
    return write_jsonl(tmp_path / "rated.jsonl", [{"instruction": "Pick one.", "completions": completions}])


def test_binarize_seed_picks_the_rejected_completion(tmp_path):
    from prefdiag.data import load_pairs

    path = rated_file(tmp_path)
    rejected = {}
    for seed in range(6):
        out = tmp_path / str(seed)
        result = invoke("audit", path, "--data-format", "rated", "--binarize-seed", seed, "-q", "-o", out)
        assert result.exit_code == 0, result.output
        table = pd.read_parquet(out / "pairs.parquet")
        rejected[seed] = table["rejected"].tolist()
        loaded = load_pairs(str(path), data_format="rated", binarize_seed=seed)
        assert rejected[seed] == loaded.table["rejected"].tolist()
        assert table["chosen"].tolist() == [" answer 5."]
    assert len({tuple(v) for v in rejected.values()}) > 1


# -- commands ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compared(model_dirs, pairs_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("compared") / "out"
    result = invoke("compare", pairs_file, "-r", model_dirs["llama"], "-p", model_dirs["llama-policy"],
                    "--device", "cpu", "-q", "-o", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("quiet", [[], ["-q"]])
def test_gate_prints_only_the_verdict_and_the_gate(compared, quiet):
    result = invoke("gate", compared, "--min", "n_pairs=1", *quiet)
    assert result.exit_code == 0, result.output
    lines = result.stdout.rstrip("\n").splitlines()
    assert lines[0].startswith("╭") and "verdict:" in lines[0]
    end = next(i for i, line in enumerate(lines) if line.startswith("╰"))
    assert all(line.startswith("│") for line in lines[1:end])
    gate = lines[end + 1 :]
    assert gate[0].strip() == "gate" and "n_pairs" in gate[4] and gate[-1] == "Gate passed: the one rule holds."
    assert len(gate) == 7  # title, top edge, header, rule, one row, bottom edge, the outcome
    assert "prefdiag compare" not in result.stdout and "worst" not in result.stdout.lower()
    assert result.stderr == ""


def test_gate_json_is_still_the_whole_summary(compared):
    result = invoke("gate", compared, "--min", "n_pairs=1", "-f", "json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["gate"]["n_rules"] == 1 and "reward_accuracy" in summary


def test_clean_is_a_prefdiag_command(tmp_path):
    rows = make_pairs(8)
    rows[2]["rejected"] = rows[2]["chosen"]  # identical
    rows[5].update({k: rows[4][k] for k in ("prompt", "chosen", "rejected")})  # a copy of q004: q004 stays
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    listed = invoke("--help")
    assert listed.exit_code == 0 and "clean" in listed.stdout
    result = invoke("clean", data, "--output", tmp_path / "clean.jsonl")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("removed 2 of 8 pairs (1 identical, 1 duplicate)")
    kept = [json.loads(line)["id"] for line in (tmp_path / "clean.jsonl").read_text().splitlines()]
    assert kept == [r["id"] for i, r in enumerate(rows) if i not in (2, 5)]
    manifest = json.loads((tmp_path / "clean.jsonl.manifest.json").read_text())
    assert manifest and "q002" in json.dumps(manifest)
    again = invoke("clean", tmp_path / "clean.jsonl", "--output", tmp_path / "again.jsonl")
    assert again.exit_code == 0 and again.stdout.startswith("removed 0 of 6 pairs")
    bad = invoke("clean", data, "--output", tmp_path / "x.jsonl", "--rule", "no_such_flag")
    assert bad.exit_code == 2 and len(bad.stderr.splitlines()) <= 2 and not (tmp_path / "x.jsonl").exists()


def test_click_abort_is_one_line_and_exit_130():
    from prefdiag.cli._errors import OneLineErrors

    aborting = typer.Typer(cls=OneLineErrors)

    @aborting.command()
    def stop() -> None:
        raise typer.Abort()

    @aborting.command()
    def other() -> None:
        pass

    result = runner.invoke(aborting, ["stop"])
    assert result.exit_code == 130 and result.stderr == "interrupted\n", result.output


def test_options_are_defined_once_and_agree_with_the_modules_that_use_them():
    from prefdiag import ches, options, tokenization
    from prefdiag.cli import _options
    from prefdiag.data import DATA_FORMATS

    assert options.COMPAT == tuple(tokenization.COMPAT_SCHEMES)
    assert options.HIGH_CHES_SHARE == ches.HIGH_CHES_TOP_SHARE == RunOptions().high_ches_share
    assert DATA_FORMATS is options.DATA_FORMATS
    assert [c.value for c in _options.Compat] == list(options.COMPAT)
    assert [c.value for c in _options.DataFormat] == list(options.DATA_FORMATS)


# -- the schema check --------------------------------------------------------------------------------------------------


def test_the_schema_check_finds_a_bad_summary_prefdiag_would_have_written(compared, tmp_path):
    import shutil

    assert invalid_summaries(compared) == []
    copy = tmp_path / "copy"
    shutil.copytree(compared, copy)
    summary = json.loads((copy / "summary.json").read_text())
    summary["schema_version"] = 2
    summary["n_over_trl_default_max_length"] = -1
    (copy / "summary.json").write_text(json.dumps(summary))
    problems = invalid_summaries(tmp_path)
    assert any("schema_version" in p for p in problems) and any("n_over_trl_default_max_length" in p for p in problems)
    (copy / "junit.xml").unlink()  # a summary.json on its own is one a test planted: not checked
    assert invalid_summaries(tmp_path) == []
