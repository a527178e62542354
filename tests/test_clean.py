"""`prefdiag clean` writes the dataset back in its own format, order and columns without exactly the planted
broken pairs, with a manifest saying which rule removed each, and cleaning the result removes nothing."""

from __future__ import annotations

import gzip
import json

import pandas as pd
import pytest
import typer
from conftest import make_conversations, make_pairs
from test_data_formats import STANDARD_FORMATS, write
from typer.testing import CliRunner

from prefdiag.clean import clean, manifest_path
from prefdiag.cli import app as main_app
from prefdiag.cli.clean_command import clean as clean_command
from prefdiag.data import load_pairs

runner = CliRunner()
app = typer.Typer()  # the command as the integrator registers it: `prefdiag clean`
app.command("clean")(clean_command)
app.command("other")(lambda: None)  # two commands, so typer keeps the command name


def planted() -> tuple[list[dict], dict[str, list[str]]]:
    """Pairs with extra columns, some planted broken; and the rules that must remove each planted pair."""
    records = [{**r, "category": "abc"[i % 3], "score": i * 0.5} for i, r in enumerate(make_pairs(14))]
    records[3]["rejected"] = records[3]["chosen"]  # identical
    records[5]["chosen"] = "  "  # empty response
    records[6]["prompt"] = ""  # empty prompt
    records[8].update({k: records[1][k] for k in ("prompt", "chosen", "rejected")})  # a copy of q001: q001 stays
    records[10].update(prompt=records[9]["prompt"], chosen=records[9]["rejected"], rejected=records[9]["chosen"])
    expected = {"q003": ["identical"], "q005": ["empty_response"], "q006": ["empty_prompt"], "q008": ["duplicate"],
                "q009": ["conflict"], "q010": ["conflict"]}  # fmt: skip
    return records, expected


def output_name(path, fmt: str, tmp_path):
    if fmt == "saved":
        return tmp_path / "cleaned"
    suffix = "".join(path.suffixes)
    return tmp_path / f"cleaned{suffix}"


@pytest.mark.parametrize("fmt", STANDARD_FORMATS)
def test_clean_removes_exactly_the_planted_pairs_in_every_format_and_is_idempotent(tmp_path, fmt):
    records, expected = planted()
    path = write(records, tmp_path / "data", fmt)
    out = output_name(path, fmt, tmp_path)
    result = runner.invoke(app, ["clean", str(path), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "removed 6 of 14 pairs" in result.stdout and "skipped: boundary_mismatch" in result.stdout
    kept = [r for r in records if r["id"] not in expected]
    table = load_pairs(str(out)).table
    assert table["pair_id"].tolist() == [r["id"] for r in kept], fmt  # input order
    assert table[["prompt", "chosen", "rejected", "category"]].to_dict("records") == [
        {k: r[k] for k in ("prompt", "chosen", "rejected", "category")} for r in kept]
    assert [str(s) for s in table["score"]] == [str(r["score"]) for r in kept]  # an extra column as written
    manifest = json.loads(manifest_path(out).read_text())
    assert {r["pair_id"]: r["rules"] for r in manifest["removed"]} == expected
    assert [r["row"] for r in manifest["removed"]] == [4, 6, 7, 9, 10, 11]
    assert manifest["n_removed"] == 6 and manifest["n_kept"] == 8 and manifest["removed_by_rule"]["conflict"] == 2
    assert manifest["skipped_rules"] == {"boundary_mismatch": manifest["skipped_rules"]["boundary_mismatch"]}

    again = clean(str(out), str(output_name(path, fmt, tmp_path / "again")))
    assert again.n_removed == 0 and again.n_pairs == 8


def test_jsonl_lines_are_written_back_byte_for_byte(tmp_path):
    records, expected = planted()
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(r, ensure_ascii=False, indent=None, separators=(",", ":")) + "\n" for r in records]
    lines[2] = lines[2].replace('"id":', '"id" :  ')  # spacing of its own
    path.write_text("".join(lines))
    clean(str(path), str(tmp_path / "out.jsonl.gz"))
    kept = [line for line, r in zip(lines, records) if r["id"] not in expected]
    assert gzip.decompress((tmp_path / "out.jsonl.gz").read_bytes()).decode() == "".join(kept)


def test_rules_from_a_saved_run_join_by_pair_id(model_dirs, tmp_path):
    records, _ = planted()
    path = write(records, tmp_path / "data", "parquet")
    run = tmp_path / "run"
    result = runner.invoke(main_app, ["audit", str(path), "-r", str(model_dirs["llama"]), "--device", "cpu",
                                      "--no-cache", "--output", str(run), "--quiet"])  # fmt: skip
    assert result.exit_code == 0, result.output
    pairs = pd.read_parquet(run / "pairs.parquet")
    flagged = pairs.loc[pairs["ref_prefers_rejected"].to_numpy(bool), "pair_id"].tolist()
    assert 0 < len(flagged) < len(pairs)
    out = tmp_path / "kept.parquet"
    result = runner.invoke(app, ["clean", str(path), "-o", str(out), "--from", str(run), "--rule",
                                 "ref_prefers_rejected"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert pd.read_parquet(out)["id"].tolist() == [r["id"] for r in records if r["id"] not in flagged]
    manifest = json.loads(manifest_path(out).read_text())
    assert manifest["flags_from"] == f"run {run}" and [r["pair_id"] for r in manifest["removed"]] == flagged

    default = clean(str(path), str(tmp_path / "default.parquet"), from_run=str(run))
    assert not default.skipped_rules  # the run had a tokenizer: boundary_mismatch was a rule
    assert set(default.removed) == {"q003", "q005", "q006", "q008", "q009", "q010"} | set(
        pairs.loc[pairs["boundary_mismatch"].to_numpy(bool), "pair_id"])


# -- a saved run's flags are this data's: the text it holds must be the data read now ---------------------------------


def saved_run(path, tmp_path, *args):
    """A model-free audit of path, saved to tmp_path/run (its pairs table holds the text it read)."""
    run = tmp_path / "run"
    result = runner.invoke(main_app, ["audit", str(path), "-o", str(run), "-q", *args])
    assert result.exit_code == 0, result.output
    return run


def refused(result, out, message: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not out.exists() and not manifest_path(out).exists()


def test_a_run_on_another_file_with_the_same_ids_is_refused(tmp_path):
    records = make_pairs(12)
    run = saved_run(write(records, tmp_path / "a", "jsonl"), tmp_path)
    records[4]["chosen"] += " edited"  # the same ids and row count, one response changed
    edited = write(records, tmp_path / "b", "jsonl")
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["clean", str(edited), "-o", str(out), "--from", str(run)])
    refused(result, out, f"--from {run}: 1 of 12 pairs in pairs.parquet differ from the data in this run (first: "
                         "pair 'q004', column 'chosen'); was it run on this file with the same options?")  # fmt: skip


HH = [{"chosen": f"\n\nHuman: q{i}?\n\nAssistant: The cat {i}.", "rejected": f"\n\nHuman: q{i}?\n\nAssistant: The "
       f"dog {i}."} for i in range(4)]  # fmt: skip


@pytest.mark.parametrize(
    ("records", "run_args", "clean_args", "message"),
    [
        ([{**r, "instruction": f"Say {i}."} for i, r in enumerate(make_pairs(6))], [], ["--prompt-column",
         "instruction"], "6 of 6 pairs in pairs.parquet differ from the data in this run (first: pair 'q000', "
         "column 'prompt')"),
        (HH, ["--data-format", "hh"], ["--data-format", "standard"], "4 of 4 pairs in pairs.parquet differ from the "
         "data in this run (first: pair '0', column 'prompt')"),  # TRL's shared prefix takes "The" into the prompt
    ],
    ids=["prompt-column", "hh-read-as-standard"],
)  # fmt: skip
def test_the_same_file_read_with_other_options_is_refused(tmp_path, records, run_args, clean_args, message):
    path = write(records, tmp_path / "data", "jsonl")
    run = saved_run(path, tmp_path, *run_args)
    out = tmp_path / "out.jsonl"
    refused(runner.invoke(app, ["clean", str(path), "-o", str(out), "--from", str(run), *clean_args]), out, message)
    result = runner.invoke(app, ["clean", str(path), "-o", str(out), "--from", str(run), *run_args])
    assert result.exit_code == 0, result.output  # read as the run read it: the same pairs


@pytest.mark.parametrize("table_format", ["parquet", "jsonl", "csv"])
def test_conversations_with_tool_calls_match_their_saved_run_in_every_table_format(tmp_path, table_format):
    records = make_conversations(8)
    records[2]["chosen"][0]["tool_calls"] = [{"name": "add", "arguments": {"a": 1, "b": 2}}]  # keys others lack
    records[3]["rejected"] = [dict(records[3]["chosen"][0])]  # identical: flagged
    path = write(records, tmp_path / "chat", "jsonl")
    run = saved_run(path, tmp_path, "--table-format", table_format)
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["clean", str(path), "-o", str(out), "--from", str(run), "--rule", "identical"])
    assert result.exit_code == 0, result.output
    assert [r["pair_id"] for r in json.loads(manifest_path(out).read_text())["removed"]] == ["c003"]
    out.unlink()
    manifest_path(out).unlink()
    records[2]["chosen"][0]["tool_calls"][0]["arguments"]["b"] = 3  # deep inside a message
    edited = write(records, tmp_path / "edited", "jsonl")
    result = runner.invoke(app, ["clean", str(edited), "-o", str(out), "--from", str(run)])
    refused(result, out, f"1 of 8 pairs in pairs.{table_format} differ from the data in this run (first: pair "
                         "'c002', column 'chosen')")  # fmt: skip


def test_a_saved_table_without_the_text_is_joined_unchecked_with_a_warning(tmp_path):
    records = make_pairs(6)
    run = saved_run(write(records, tmp_path / "a", "jsonl"), tmp_path)
    table = pd.read_parquet(run / "pairs.parquet")
    table.drop(columns=["prompt", "chosen", "rejected"]).to_parquet(run / "pairs.parquet", index=False)
    records[1]["chosen"] = records[1]["rejected"]  # edited: identical now, but the run's flags say not
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["clean", str(write(records, tmp_path / "b", "jsonl")), "-o", str(out), "--from",
                                 str(run)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "removed 0 of 6 pairs" in result.stdout  # the saved flags, as before
    assert "pairs.parquet has no prompt, chosen, rejected columns: cannot check" in " ".join(result.stderr.split())


def test_scoring_options_with_from_are_named_as_ignored(tmp_path):
    path = write(make_pairs(6), tmp_path / "a", "jsonl")
    run = saved_run(path, tmp_path)
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages }}")
    args = ["clean", str(path), "--from", str(run)]
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "plain.jsonl")])
    assert result.exit_code == 0 and "ignoring" not in result.stderr, result.output
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "out.jsonl"), "--compat", "trl0", "--max-prompt-length",
                                 "8", "--max-length", "64", "--tokenizer", "some/tokenizer", "--chat-template",
                                 str(template)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert ("ignoring --max-length, --tokenizer, --chat-template, --compat, --max-prompt-length: the flags come from "
            "the saved run") in " ".join(result.stderr.split())  # fmt: skip
    assert result.stderr.count("WARNING") == 1


def test_rated_completions_are_cleaned_as_their_input_rows(tmp_path):
    rows = [{"instruction": f"Q{i}?", "completions": [{"response": " same", "overall_score": 9.0},
                                                       {"response": " same" if i == 1 else f" other {i}",
                                                        "overall_score": 2.0}]} for i in range(3)]  # fmt: skip
    rows.append({"instruction": "tie", "completions": [{"response": " a", "overall_score": 5.0},
                                                       {"response": " b", "overall_score": 5.0}]})  # fmt: skip
    path = write(rows, tmp_path / "uf", "jsonl")
    result = clean(str(path), str(tmp_path / "out.jsonl"))
    assert list(result.removed) == ["1"]  # the identical pair, by its input row; the tie row is no pair: kept
    assert [json.loads(line)["instruction"] for line in (tmp_path / "out.jsonl").read_text().splitlines()] == [
        "Q0?", "Q2?", "tie"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rule", "nonsense"], "clean: no boolean flag 'nonsense' in the per-pair table (model-free checks); flags:"),
        (["--rule", "ref_prefers_rejected"], "no boolean flag 'ref_prefers_rejected'"),
        (["--from", "{tmp}/absent"], "no pairs.parquet"),
    ],
)
def test_bad_rules_are_one_line_and_write_nothing(tmp_path, args, message):
    path = write(planted()[0], tmp_path / "data", "jsonl")
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["clean", str(path), "-o", str(out), *[a.format(tmp=tmp_path) for a in args]])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not out.exists() and not manifest_path(out).exists()


def test_output_must_keep_the_input_format(tmp_path):
    path = write(planted()[0], tmp_path / "data", "jsonl")
    result = runner.invoke(app, ["clean", str(path), "-o", str(tmp_path / "out.csv")])
    assert result.exit_code == 2 and "expected a jsonl file name like the input" in result.stderr


# -- the options clean shares with audit -------------------------------------------------------------------------------


def rated_rows() -> list[dict]:
    """UltraFeedback-style rows whose pairs depend on the binarize seed: the rejected completion is drawn among
    " A" (the chosen text again: an identical pair), " B" and " C", so seeds differ in what is identical or a copy."""
    completions = [{"response": " A", "overall_score": 9.0}, {"response": " A", "overall_score": 1.0},
                   {"response": " B", "overall_score": 2.0}, {"response": " C", "overall_score": 3.0}]  # fmt: skip
    return [{"instruction": "Same?", "completions": completions} for _ in range(6)]


def removed_by_default(run) -> set[str]:
    """The pairs the default rules remove, from a saved run's own per-pair table."""
    pairs = pd.read_parquet(run / "pairs.parquet")
    flags = [r for r in ("identical", "empty_response", "empty_prompt", "boundary_mismatch", "conflict")
             if r in pairs.columns]  # fmt: skip
    flagged = pairs[flags].fillna(False).astype(bool).any(axis=1) | pairs.duplicated(["prompt", "chosen", "rejected"])
    return set(pairs.loc[flagged, "pair_id"].astype(str))


def test_rated_data_is_binarised_with_the_binarize_seed_as_audit_does(model_dirs, tmp_path):
    path = write(rated_rows(), tmp_path / "uf", "jsonl")
    scoring = ["-r", str(model_dirs["llama"]), "--device", "cpu", "--no-cache"]
    run = tmp_path / "run"
    result = runner.invoke(main_app, ["audit", str(path), *scoring, "--binarize-seed", "3", "-o", str(run), "-q"])
    assert result.exit_code == 0, result.output
    expected = removed_by_default(run)
    removed = {}
    for seed in ("3", "0"):
        out = tmp_path / f"seed{seed}.jsonl"
        result = runner.invoke(app, ["clean", str(path), "-o", str(out), *scoring, "--binarize-seed", seed])
        assert result.exit_code == 0, result.output
        removed[seed] = {r["pair_id"] for r in json.loads(manifest_path(out).read_text())["removed"]}
    assert removed["3"] == expected and removed["0"] != expected  # seed 0 would be other pairs
    kept = [line for i, line in enumerate(path.read_text().splitlines()) if str(i) not in expected]
    assert (tmp_path / "seed3.jsonl").read_text().splitlines() == kept


def test_from_a_rated_run_uses_its_seed_and_refuses_another(tmp_path):
    path = write(rated_rows(), tmp_path / "uf", "jsonl")
    run = tmp_path / "run"
    result = runner.invoke(main_app, ["audit", str(path), "--binarize-seed", "3", "-o", str(run), "-q"])
    assert result.exit_code == 0, result.output
    expected = removed_by_default(run)
    assert expected == {"0", "2", "3", "5"}  # (seed 0 removes 1, 2, 3 and 5)
    for given in ([], ["--binarize-seed", "3"]):
        out = tmp_path / f"out{len(given)}.jsonl"
        result = runner.invoke(app, ["clean", str(path), "-o", str(out), "--from", str(run), *given])
        assert result.exit_code == 0, result.output
        assert {r["pair_id"] for r in json.loads(manifest_path(out).read_text())["removed"]} == expected, given
    assert set(clean(str(path), str(tmp_path / "library.jsonl"), from_run=str(run)).removed) == expected
    for given, message in (
        (["--binarize-seed", "0"], f"--from {run}: the run binarised the rated data with --binarize-seed 3, this "
                                   "clean with --binarize-seed 0"),
        (["--data-format", "rated-best-worst"], f"--from {run}: the run read the data as rated pairs (--data-format "
                                                "auto), this clean as rated-best-worst pairs"),
    ):  # fmt: skip
        out = tmp_path / "refused.jsonl"
        result = runner.invoke(app, ["clean", str(path), "-o", str(out), "--from", str(run), *given])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], result.stderr
        assert not out.exists()


def test_chat_template_gives_a_tokenizer_without_one_a_template(model_dirs, chat_file, tmp_path):
    from conftest import CHATML

    args = ["clean", str(chat_file), "-r", str(model_dirs["llama"]), "--device", "cpu"]
    refused = runner.invoke(app, [*args, "-o", str(tmp_path / "refused.jsonl")])
    assert refused.exit_code == 2 and "no chat template" in refused.stderr.splitlines()[0]
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    result = runner.invoke(app, [*args, "--chat-template", str(template), "-o", str(tmp_path / "out.jsonl")])
    assert result.exit_code == 0, result.output
    manifest = json.loads(manifest_path(tmp_path / "out.jsonl").read_text())
    assert manifest["skipped_rules"] == {} and "boundary_mismatch" in manifest["removed_by_rule"]  # a tokenizer ran


def test_compat_reaches_the_tokenizer(model_dirs, tmp_path):
    records = make_pairs(6)
    for record in records[:3]:  # a prompt ending in a space merges into the completion under TRL 1.x
        record.update(prompt="Question: the ", chosen="cat sat.")
    path = write(records, tmp_path / "data", "jsonl")
    args = ["clean", str(path), "-r", str(model_dirs["llama"]), "--device", "cpu", "--rule", "boundary_mismatch"]
    mismatched = {}
    for name, extra in (("trl1", []), ("trl0", ["--compat", "trl0"])):
        out = tmp_path / f"{name}.jsonl"
        result = runner.invoke(app, [*args, *extra, "-o", str(out)])
        assert result.exit_code == 0, result.output
        mismatched[name] = json.loads(manifest_path(out).read_text())["n_removed"]
    assert mismatched["trl1"] == 3 and mismatched["trl0"] == 0  # TRL 0.x tokenizes the parts apart: no mismatch
    bad = runner.invoke(app, [*args, "--max-prompt-length", "8", "-o", str(tmp_path / "bad.jsonl")])
    assert bad.exit_code == 2 and "applies to --compat trl0 and rewardbench only" in bad.stderr.splitlines()[0]
    assert not (tmp_path / "bad.jsonl").exists()


def test_every_shared_option_reaches_the_run_options(monkeypatch, tmp_path):
    from prefdiag import api

    seen = []
    audit = api.audit

    def recording_audit(data, reference, options, progress=None):
        seen.append(options)
        return audit(data, None, options, progress)  # the model-free table: no model to load

    monkeypatch.setattr(api, "audit", recording_audit)
    path = write(planted()[0], tmp_path / "data", "jsonl")
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages }}")
    result = runner.invoke(app, ["clean", str(path), "-o", str(tmp_path / "out.jsonl"), "-r", "some/model",
                                 "--tokenizer", "some/tokenizer", "--reference-revision", "v2", "--trust-remote-code",
                                 "--chat-template", str(template), "--compat", "rewardbench", "--max-prompt-length",
                                 "64", "--binarize-seed", "7"])  # fmt: skip
    assert result.exit_code == 0, result.output
    [options] = seen
    assert (options.tokenizer, options.reference_revision, options.trust_remote_code, options.chat_template,
            options.compat, options.max_prompt_length, options.binarize_seed) == (
        "some/tokenizer", "v2", True, str(template), "rewardbench", 64, 7)  # fmt: skip
