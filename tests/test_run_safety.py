"""Failures that must cost at most speed or one clear line: damaged or unwritable caches, an --output that cannot be
written, a summary in another schema, click's own usage errors; and the published schemas hold."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from prefdiag import api
from prefdiag.cli import app

runner = CliRunner()
SAMPLE = Path(__file__).parent.parent / "sample_data"


def _options(cache_dir, **kwargs):
    return api.RunOptions(dtype="float32", device="cpu", cache_dir=str(cache_dir), **kwargs)


def test_damaged_caches_are_ignored_with_a_warning_and_rebuilt(model_dirs, pairs_file, tmp_path, caplog):
    ref = str(model_dirs["gpt2"])
    first = api.audit(str(pairs_file), ref, _options(tmp_path))
    shards = list(tmp_path.glob("*/shard-*.parquet"))
    tokens = list((tmp_path / "tokens").glob("*.npz"))
    assert shards and tokens
    shards[0].write_bytes(shards[0].read_bytes()[:40])  # truncated mid-write
    tokens[0].write_bytes(b"PK\x03\x04 not a zip at all")  # garbage where an .npz was
    caplog.set_level(logging.WARNING, logger="prefdiag")
    again = api.audit(str(pairs_file), ref, _options(tmp_path))
    assert "ignoring an unreadable cache shard" in caplog.text and "ignoring an unreadable token cache" in caplog.text
    assert again.summary["provenance"]["reference"]["pairs_from_cache"] == 0
    np.testing.assert_allclose(again.pairs["ref_chosen_logp"], first.pairs["ref_chosen_logp"], atol=1e-5, rtol=0)
    third = api.audit(str(pairs_file), ref, _options(tmp_path))  # rebuilt by the second run
    assert third.summary["provenance"]["reference"]["pairs_from_cache"] == 24


def test_a_cache_that_cannot_be_written_is_a_warning_and_the_run_goes_on(model_dirs, pairs_file, tmp_path, caplog):
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache directory would go")
    caplog.set_level(logging.WARNING, logger="prefdiag")
    result = api.audit(str(pairs_file), str(model_dirs["gpt2"]), _options(blocked))
    assert result.summary["n_scored"] == 24
    assert "cannot save log-probs to the cache" in caplog.text


def test_stale_temporary_files_are_swept_and_fresh_ones_kept(tmp_path):
    from prefdiag.cache import sweep_stale_temporaries

    stale, fresh = tmp_path / ".shard-1.parquet.ab.tmp", tmp_path / ".shard-2.parquet.cd.tmp"
    stale.write_text("x")
    fresh.write_text("x")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    sweep_stale_temporaries(tmp_path)
    assert not stale.exists() and fresh.exists()


def test_an_output_that_cannot_be_written_fails_before_any_model_loads(model_dirs, pairs_file, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker / "out"
    result = runner.invoke(app, ["compare", str(pairs_file), "-r", str(model_dirs["gpt2"]), "-p",
                                 str(model_dirs["gpt2-policy"]), "-o", str(out), "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"Error: --output {out}: cannot be created: {blocker} is a file")
    assert not (tmp_path / "c").exists()  # nothing was tokenized or scored


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    result = runner.invoke(app, ["audit", str(SAMPLE / "pairs.jsonl"), "-q", "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("version", [2, None])
def test_gate_and_baseline_refuse_a_summary_of_another_schema(saved_run, tmp_path, version):
    summary = json.loads((saved_run / "summary.json").read_text())
    summary.pop("schema_version")
    if version is not None:
        summary["schema_version"] = version
    other = tmp_path / "summary.json"
    other.write_text(json.dumps(summary))
    found = "has no schema_version" if version is None else f"has schema_version {version}"
    for args in (["gate", str(other), "--min", "n_pairs=1"],
                 ["audit", str(SAMPLE / "pairs.jsonl"), "--baseline", str(other)]):  # fmt: skip
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        first = result.stderr.splitlines()[0]
        assert first.startswith(f"Error: {other}: this summary.json {found}; this prefdiag")
        assert "reads schema_version 1" in first


def test_every_summary_matches_the_published_schema(saved_run, tmp_path):
    import jsonschema

    from prefdiag.schemas import pair_columns, summary_schema

    schema = summary_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    regated = tmp_path / "regated"
    assert runner.invoke(app, ["gate", str(saved_run), "--min", "n_pairs=1", "-q", "-o", str(regated)]).exit_code == 0
    for path in (saved_run / "summary.json", regated / "summary.json"):
        jsonschema.validate(json.loads(path.read_text()), schema)
    bad = {**json.loads((saved_run / "summary.json").read_text()), "identical_rate": 3.5}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    import pandas as pd

    table = pd.read_parquet(saved_run / "pairs.parquet")
    columns = pair_columns()
    for column in table.columns:
        if column in columns:
            kind = columns[column]
            assert (str(table[column].dtype) in ("str", "string", "object")) if kind == "string" else (
                str(table[column].dtype) == kind), column


@pytest.mark.parametrize(
    "args, message",
    [
        (["audit", "{data}", "--dtype", "float8"], "Invalid value for '--dtype'"),
        (["audit", "{data}", "--layout", "nonsense"], "Invalid value for '--layout'"),
        (["audit", "{data}", "--format", "yaml"], "Invalid value for '--format'"),
        (["audit", "{data}", "--beta", "abc"], "Invalid value for '--beta'"),
        (["audit", "{data}", "--frobnicate"], "No such option: --frobnicate"),
        (["compare", "{data}"], "Missing option '--reference'"),
    ],
)
def test_click_usage_errors_are_one_line_exit_2(args, message):
    result = runner.invoke(app, [a.replace("{data}", str(SAMPLE / "pairs.jsonl")) for a in args])
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.stderr


def test_a_folder_without_config_is_not_a_model_directory(tmp_path):
    empty = tmp_path / "just-a-folder"
    empty.mkdir()
    result = runner.invoke(app, ["audit", str(SAMPLE / "pairs.jsonl"), "-r", str(empty)])
    assert result.exit_code == 2
    assert result.stderr.splitlines()[0] == f"Error: reference {str(empty)!r} is not a model directory (no config.json)"


def test_a_hub_model_offline_is_one_line_with_the_hint():
    import subprocess
    import sys

    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "prefdiag", "audit", str(SAMPLE / "pairs.jsonl"), "-r",
                           "no-such-org/no-such-model"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0].startswith("Error: cannot load a tokenizer from 'no-such-org/no-such-model'")
    assert lines[1].startswith("Hint: HF_HUB_OFFLINE is set: download it first") and len(lines) == 2
    assert time.monotonic() - started < 60  # no retries


def test_group_by_takes_input_names_and_suggests_a_close_one(tmp_path):
    rows = [{"id": f"p{i}", "question": "q?", "chosen": " a.", "rejected": " b.", "topic": "x" if i % 2 else "y"}
            for i in range(6)]  # fmt: skip
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    result = runner.invoke(app, ["audit", str(path), "--prompt-column", "question", "--group-by", "id", "-q",
                                 "-o", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    groups = json.loads((out / "summary.json").read_text())["groups"]
    assert groups["column"] == "pair_id" and sorted(groups["values"]) == [f"p{i}" for i in range(6)]
    result = runner.invoke(app, ["audit", str(path), "--prompt-column", "question", "--group-by", "topc"])
    assert result.exit_code == 2
    assert result.stderr.splitlines()[0].endswith("did you mean 'topic'?")
