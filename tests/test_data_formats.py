"""Every dataset shape users have loads from a real file in every format, with the same pairs and the same numbers:
standard and conversational, explicit and implicit prompts (TRL's extract_prompt), Anthropic HH transcripts (split
at the last shared Assistant turn), column mapping, extra columns passed through to pairs.parquet."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import make_conversations, make_pairs
from typer.testing import CliRunner

from prefdiag import api
from prefdiag.cli import app
from prefdiag.data import extract_prompt, load_pairs

runner = CliRunner()


CHECK_COLUMNS = ["identical", "near_identical", "near_identical_score", "duplicate", "conflict", "empty_response",
                 "empty_prompt", "length_ratio", "length_ratio_score"]


def write(records: list[dict], path, fmt: str):
    """records as a real file (or save_to_disk directory) in format fmt; returns the path to load."""
    frame = pd.DataFrame(records)
    if fmt == "jsonl":
        path = path.with_suffix(".jsonl")
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif fmt == "jsonl.gz":  # how HH-RLHF ships
        import gzip

        path = path.with_suffix(".jsonl.gz")
        path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode()))
    elif fmt == "json":
        path = path.with_suffix(".json")
        path.write_text(json.dumps(records, indent=1))
    elif fmt == "json-columns":
        path = path.with_suffix(".json")
        path.write_text(json.dumps({k: [r[k] for r in records] for k in records[0]}))
    elif fmt == "json-lines":  # what datasets' to_json writes: JSON Lines under a .json name
        import datasets

        path = path.with_suffix(".json")
        datasets.Dataset.from_list(records).to_json(str(path))
    elif fmt == "csv":
        path = path.with_suffix(".csv")
        for column in frame.columns:  # conversations are written as JSON text, as pandas users do
            if frame[column].map(lambda v: isinstance(v, list)).any():
                frame[column] = frame[column].map(json.dumps)
        frame.to_csv(path, index=False)
    elif fmt == "parquet":
        path = path.with_suffix(".parquet")
        frame.to_parquet(path, index=False)
    elif fmt == "saved":
        import datasets

        datasets.Dataset.from_list(records).save_to_disk(str(path))
    else:
        raise ValueError(fmt)
    return path


def plain(table: pd.DataFrame, columns=("pair_id", "prompt", "chosen", "rejected")) -> list[dict]:
    return [{c: row[c] for c in columns} for row in table.to_dict("records")]


STANDARD_FORMATS = ["jsonl", "jsonl.gz", "json", "json-columns", "json-lines", "csv", "parquet", "saved"]
CHAT_FORMATS = ["jsonl", "json", "json-lines", "csv", "parquet", "saved"]


def test_standard_pairs_are_the_same_in_every_format_and_so_are_the_numbers(model_dirs, tmp_path):
    records = [{**r, "category": "abc"[i % 3]} for i, r in enumerate(make_pairs(12))]
    records[3]["rejected"] = records[3]["chosen"]  # a planted identical pair must be found in every format
    options = api.RunOptions(device="cpu", cache=False, group_by="category")
    results = {}
    for fmt in STANDARD_FORMATS:
        path = write(records, tmp_path / fmt, fmt)
        assert plain(load_pairs(str(path)).table) == [
            {"pair_id": r["id"], "prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
            for r in records
        ], fmt
        results[fmt] = api.audit(str(path), str(model_dirs["llama"]), options)
    first = results["jsonl"]
    assert first.pairs["identical"].sum() == 1
    for fmt, result in results.items():
        pd.testing.assert_frame_equal(
            result.pairs[["ref_chosen_logp", "ref_rejected_logp", "chosen_tokens", *CHECK_COLUMNS]],
            first.pairs[["ref_chosen_logp", "ref_rejected_logp", "chosen_tokens", *CHECK_COLUMNS]],
        )
        assert result.summary["groups"] == first.summary["groups"], fmt
        assert result.summary["ref_ranking_accuracy"] == first.summary["ref_ranking_accuracy"]
        assert result.pairs["category"].tolist() == [r["category"] for r in records]


def test_conversations_are_the_same_in_every_format_and_so_are_the_numbers(model_dirs, tmp_path):
    records = make_conversations(8)
    options = api.RunOptions(device="cpu", cache=False)
    results = {}
    for fmt in CHAT_FORMATS:
        path = write(records, tmp_path / fmt, fmt)
        data = load_pairs(str(path))
        assert data.conversational and not data.implicit_prompt, fmt
        assert plain(data.table) == [
            {"pair_id": r["id"], "prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
            for r in records
        ], fmt
        results[fmt] = api.audit(str(path), str(model_dirs["qwen"]), options).pairs
    for fmt, pairs in results.items():
        pd.testing.assert_frame_equal(pairs[["ref_chosen_logp", "ref_rejected_logp", *CHECK_COLUMNS]],
                                      results["jsonl"][["ref_chosen_logp", "ref_rejected_logp", *CHECK_COLUMNS]])


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv"])
def test_implicit_string_prompts_split_exactly_as_trl(tmp_path, fmt):
    from trl.data_utils import extract_prompt as trl_extract

    records = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in make_pairs()]
    records.append({"chosen": "same start here", "rejected": "same start"})  # one is a prefix of the other
    records.append({"chosen": "x ", "rejected": "y"})  # differs at once, chosen ends in a space (TRL's quirk)
    data = load_pairs(str(write(records, tmp_path / "implicit", fmt)))
    assert data.implicit_prompt and data.prompt_split == "extract_prompt"
    for row, record in zip(data.table.to_dict("records"), records):
        want = trl_extract(record)
        assert (row["prompt"], row["chosen"], row["rejected"]) == (want["prompt"], want["chosen"], want["rejected"])


def test_implicit_conversation_prompts_split_exactly_as_trl(tmp_path):
    from trl.data_utils import maybe_extract_prompt

    records = [{"id": r["id"], "chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
               for r in make_conversations()]
    # UltraFeedback's shape: a string prompt beside whole conversations; TRL ignores the string and extracts.
    records = [{**r, "prompt": r["chosen"][-2]["content"]} for r in records]
    path = write(records, tmp_path / "implicit", "parquet")
    data = load_pairs(str(path))
    assert data.conversational and data.implicit_prompt
    for row, record in zip(data.table.to_dict("records"), records):
        want = maybe_extract_prompt(record)
        assert (row["prompt"], row["chosen"], row["rejected"]) == (want["prompt"], want["chosen"], want["rejected"])
        assert row["original_prompt"] == record["prompt"]  # kept, as an extra column


def hh(turns: list[tuple[str, str]], last_human: str, response: str) -> str:
    history = "".join(f"\n\nHuman: {h}\n\nAssistant: {a}" for h, a in turns)
    return f"{history}\n\nHuman: {last_human}\n\nAssistant: {response}"


HH_RECORDS = [
    # responses that start alike: TRL's extract_prompt would move " I think" into the prompt
    {"chosen": hh([("hi", "hello")], "what is 2+2?", "I think it is 4."),
     "rejected": hh([("hi", "hello")], "what is 2+2?", "I think it is 5.")},
    {"chosen": hh([], "name a fruit", "Apple."), "rejected": hh([], "name a fruit", "A car.")},
    # histories that differ at an earlier Assistant turn: the split is at the last turn both share
    {"chosen": hh([("hi", "hello there")], "bye", "Goodbye!"),
     "rejected": hh([("hi", "go away")], "bye", "Whatever.")},
]


@pytest.mark.parametrize("fmt", ["jsonl.gz", "csv", "saved"])
def test_hh_transcripts_split_at_the_last_shared_assistant_turn(tmp_path, fmt):
    data = load_pairs(str(write(HH_RECORDS, tmp_path / "hh", fmt)))
    assert data.prompt_split == "hh" and data.implicit_prompt and not data.conversational
    rows = data.table.to_dict("records")
    assert rows[0]["prompt"] == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: what is 2+2?\n\nAssistant:"
    assert (rows[0]["chosen"], rows[0]["rejected"]) == (" I think it is 4.", " I think it is 5.")
    assert (rows[1]["prompt"], rows[1]["chosen"]) == ("\n\nHuman: name a fruit\n\nAssistant:", " Apple.")
    assert rows[2]["prompt"] == "\n\nHuman: hi\n\nAssistant:"
    assert rows[2]["chosen"] == " hello there\n\nHuman: bye\n\nAssistant: Goodbye!"
    for row, record in zip(rows, HH_RECORDS):
        assert row["prompt"] + row["chosen"] == record["chosen"]
        assert row["prompt"] + row["rejected"] == record["rejected"]


def test_data_format_standard_on_hh_gives_trls_extract_prompt(tmp_path):
    path = write(HH_RECORDS, tmp_path / "hh", "jsonl")
    data = load_pairs(str(path), data_format="standard")
    assert data.prompt_split == "extract_prompt"
    row = data.table.iloc[0]
    assert (row["prompt"], row["chosen"], row["rejected"]) == extract_prompt(HH_RECORDS[0]["chosen"],
                                                                            HH_RECORDS[0]["rejected"])
    assert row["prompt"].endswith("Assistant: I think it is")  # the mismatch TRL issue 1858 is about


def test_hh_through_the_cli_with_a_model(model_dirs, tmp_path):
    path = write(HH_RECORDS, tmp_path / "hh", "jsonl")
    out = tmp_path / "out"
    result = runner.invoke(app, ["audit", str(path), "-r", str(model_dirs["gpt2"]), "--device", "cpu",
                                 "--data-format", "hh", "-o", str(out), "-q", "--no-cache"])
    assert result.exit_code == 0, result.output
    pairs = pd.read_parquet(out / "pairs.parquet")
    assert pairs["prompt"].str.endswith("\n\nAssistant:").all()
    assert pairs["ref_chosen_logp"].notna().all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["provenance"]["dataset"]["prompt_split"] == "hh"
    assert summary["provenance"]["options"]["data_format"] == "hh"


def test_column_mapping_and_extra_columns_pass_through_to_pairs_parquet(tmp_path):
    records = [
        {"uid": f"u{i}", "question": r["prompt"], "good": r["chosen"], "bad": r["rejected"], "rating": i / 2,
         "meta": {"source": "web", "turns": i}, "tags": ["a", "b"][: i % 3], "created": "2024-01-0%d" % (1 + i % 9)}
        for i, r in enumerate(make_pairs(6))
    ]
    path = write(records, tmp_path / "mapped", "jsonl")
    out = tmp_path / "out"
    result = runner.invoke(app, ["audit", str(path), "--prompt-column", "question", "--chosen-column", "good",
                                 "--rejected-column", "bad", "--id-column", "uid", "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    pairs = pd.read_parquet(out / "pairs.parquet")
    assert pairs["pair_id"].tolist() == [r["uid"] for r in records]
    assert pairs["prompt"].tolist() == [r["question"] for r in records]
    assert pairs["rating"].tolist() == [r["rating"] for r in records]
    assert [dict(m) for m in pairs["meta"]] == [r["meta"] for r in records]
    assert [list(t) for t in pairs["tags"]] == [r["tags"] for r in records]
    assert pairs["created"].tolist() == [r["created"] for r in records]  # ISO dates stay text
    assert not {"question", "good", "bad", "uid"} & set(pairs.columns)


def test_strings_that_look_like_dates_or_numbers_stay_text(tmp_path):
    records = [{"prompt": "When?", "chosen": "2024-01-01", "rejected": "2024-01-02T10:00:00"}] * 2
    for fmt in ("jsonl", "csv"):
        table = load_pairs(str(write(records, tmp_path / "dates", fmt))).table
        assert table["chosen"].tolist() == ["2024-01-01"] * 2
        assert table["rejected"].tolist() == ["2024-01-02T10:00:00"] * 2


def test_a_column_whose_type_changes_late_in_the_file_still_loads(tmp_path):
    records = [{"prompt": f"p{i}", "chosen": "yes", "rejected": "no", "score": i} for i in range(50)]
    records[40]["score"] = "n/a"  # numbers, then a string: Arrow refuses, the Python reader takes over
    records[45]["extra_late"] = {"x": 1}  # a field that first appears late
    table = load_pairs(str(write(records, tmp_path / "late", "jsonl"))).table
    assert len(table) == 50 and table["score"].iloc[40] == "n/a" and table["score"].iloc[3] == "3"
    result = api.audit(load_pairs(str(tmp_path / "late.jsonl")))
    assert result.summary["n_pairs"] == 50


def test_conversational_override_parses_json_encoded_messages(tmp_path):
    records = [{"prompt": json.dumps(r["prompt"]), "chosen": json.dumps(r["chosen"]), "rejected":
                json.dumps(r["rejected"])} for r in make_conversations(4)]
    path = write(records, tmp_path / "encoded", "jsonl")
    assert not load_pairs(str(path)).conversational  # auto: JSON text in a JSONL file is text
    data = load_pairs(str(path), data_format="conversational")
    assert data.conversational
    assert data.table["chosen"].iloc[0] == make_conversations(4)[0]["chosen"]


def test_model_free_audit_of_every_format_is_the_same(tmp_path):
    records = [{**r, "rejected": r["chosen"] if i % 5 == 0 else r["rejected"]} for i, r in enumerate(make_pairs())]
    records += records[:3]  # duplicates
    records = [{**r, "id": f"r{i}"} for i, r in enumerate(records)]
    summaries = {}
    for fmt in STANDARD_FORMATS:
        summary = api.audit(str(write(records, tmp_path / fmt, fmt))).summary
        summaries[fmt] = {k: v for k, v in summary.items() if k not in ("provenance",)}
    assert summaries["jsonl"]["n_duplicate"] == 6 and summaries["jsonl"]["n_identical"] == 6
    for fmt, summary in summaries.items():
        assert summary == summaries["jsonl"], fmt
    assert np.isfinite(summaries["csv"]["length_ratio_rate"])
