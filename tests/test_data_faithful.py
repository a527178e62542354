"""The data reaches prefdiag exactly as written: message dicts without keys added or dropped (tool calls whose
arguments differ in keys from row to row), the chat-template columns as Python objects, ids in their written form,
and every fault (a message without content, bytes that are not UTF-8, a truncated gzip, a ragged CSV row, a
misspelt column) named by file, line or row and column, exit 2."""

from __future__ import annotations

import gzip
import json

import pandas as pd
import pytest
from test_data_formats import write
from typer.testing import CliRunner

from prefdiag.cli import app
from prefdiag.data import load_pairs

runner = CliRunner()
FORMATS = ["jsonl", "json", "json-lines", "csv", "parquet", "saved"]


def tool_call(name: str, arguments: dict) -> dict:
    return {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": name, "arguments": arguments}}]}


def tool_records() -> list[dict]:
    """Tool-calling conversations whose arguments (and tools' parameters) differ in keys from row to row."""
    tools = [
        [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}}}}}],
        [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {
            "a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}}],
        [{"type": "function", "function": {"name": "now", "description": "the time"}}],
    ]
    calls = [("weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2}), ("now", {})]
    rows = []
    for i, ((name, arguments), tool) in enumerate(zip(calls, tools)):
        rows.append({
            "id": f"t{i}",
            "prompt": [{"role": "user", "content": f"question {i}"}],
            "chosen": [tool_call(name, arguments)],
            "rejected": [{"role": "assistant", "content": f"I cannot {i}"}],
            "tools": tool,
        })
    return rows


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "json-lines"])  # datasets' to_json writes the nulls
def test_tool_calls_and_tools_are_read_exactly_as_written(tmp_path, fmt):
    records = tool_records()
    table = load_pairs(str(write(records, tmp_path / "tools", fmt))).table
    for column in ("prompt", "chosen", "rejected", "tools"):
        assert table[column].tolist() == [r[column] for r in records], (fmt, column)
    assert table["tools"].dtype == object  # Python objects, as the chat template receives them


def test_a_model_free_audit_of_tool_calls_sees_different_calls_as_different(tmp_path):
    records = tool_records()
    records.append({**records[1], "id": "t3", "chosen": [tool_call("add", {"a": 1, "b": 3})],
                    "rejected": [tool_call("add", {"a": 1, "b": 2})]})  # fmt: skip
    path = write(records, tmp_path / "tools", "jsonl")
    result = runner.invoke(app, ["audit", str(path), "--output", str(tmp_path / "out")])
    assert result.exit_code in (0, 1), result.output
    pairs = pd.read_parquet(tmp_path / "out" / "pairs.parquet")
    assert not pairs["identical"].any() and not pairs["empty_response"].any()


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "json", "json-columns", "csv", "parquet", "saved"])
def test_numeric_ids_keep_their_written_form(tmp_path, fmt):
    records = [{"id": i, "prompt": "p", "chosen": f"a{k}", "rejected": "b"} for k, i in enumerate([1, 2, 2.5, 4])]
    if fmt == "csv":  # pandas would write the float column as 1.0, 2.0...: write the text by hand
        path = tmp_path / "ids.csv"
        path.write_text("id,prompt,chosen,rejected\n" + "".join(f"{r['id']},p,{r['chosen']},b\n" for r in records))
    else:  # Parquet and datasets store 1, 2, 2.5, 4 as doubles: their natural text has no ".0" on whole numbers
        path = write(records, tmp_path / "ids", fmt)
    assert load_pairs(str(path)).table["pair_id"].tolist() == ["1", "2", "2.5", "4"], fmt


def test_ids_written_as_decimals_stay_decimals(tmp_path):
    path = tmp_path / "ids.jsonl"
    path.write_text("".join(f'{{"id": {i}, "prompt": "p", "chosen": "a{i}", "rejected": "b"}}\n'
                            for i in ("1.0", "2.50", "1e3")))  # fmt: skip
    assert load_pairs(str(path)).table["pair_id"].tolist() == ["1.0", "2.50", "1e3"]


def messages_row(chosen: list) -> dict:
    return {"prompt": [{"role": "user", "content": "hi"}], "chosen": chosen,
            "rejected": [{"role": "assistant", "content": "no"}]}  # fmt: skip


def jsonl(*rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


GOOD = {"prompt": "Question: why?", "chosen": " Because.", "rejected": " No."}
FAULTS = {  # name -> (file name, bytes, message on stderr)
    "message without content": ("nocontent.jsonl", jsonl(messages_row([{"role": "assistant", "content": "x"}]),
                                                         messages_row([{"role": "assistant"}])),
                                "nocontent.jsonl: row 2, column 'chosen': message 1 (assistant) has no content"),
    "message without a role": ("norole.jsonl", jsonl(messages_row([{"content": "x"}])),
                               "norole.jsonl: row 1, column 'chosen': message 1 has no role"),
    "null content": ("null.json", json.dumps([messages_row([{"role": "assistant", "content": None}])]),
                     "null.json: row 1, column 'chosen': message 1 (assistant) has no content"),
    "message without content in CSV": ("nocontent.csv", "prompt,chosen,rejected\n" + ",".join(
        '"' + json.dumps(v).replace('"', '""') + '"' for v in messages_row([{"role": "assistant"}]).values()) + "\n",
        "nocontent.csv: row 1, column 'chosen': message 1 (assistant) has no content"),
    "invalid UTF-8 in JSON Lines": ("bytes.jsonl", jsonl(GOOD).encode() + b'{"prompt": "a\xff", "chosen": "b", '
                                    b'"rejected": "c"}\n', "bytes.jsonl:2:14: not UTF-8 text (byte 0xff)"),
    "invalid UTF-8 in gzipped JSON Lines": ("bytes.jsonl.gz", gzip.compress(jsonl(GOOD, GOOD).encode() + b'{"x\xc3('),
                                            "bytes.jsonl.gz:3:4: not UTF-8 text (byte 0xc3)"),
    "invalid UTF-8 in CSV": ("bytes.csv", b"prompt,chosen,rejected\np,a,b\np,\xe9t\xe9,b\n",
                             "bytes.csv:3:3: not UTF-8 text (byte 0xe9)"),
    "invalid UTF-8 in JSON": ("bytes.json", b'[\n{"prompt": "p", "chosen": "a", "rejected": "\x80"}]',
                              "bytes.json:2:45: not UTF-8 text (byte 0x80)"),
    "truncated gzip": ("cut.jsonl.gz", gzip.compress(jsonl(*[GOOD] * 200).encode())[:-12],
                       "cut.jsonl.gz: the compressed file ends early or is corrupt"),
    "truncated gzip CSV": ("cut.csv.gz", gzip.compress(("prompt,chosen,rejected\n" + "p,a,b\n" * 300).encode())[:-9],
                           "cut.csv.gz: the compressed file ends early or is corrupt"),
    "CSV row missing a value": ("ragged.csv", "prompt,chosen,rejected\np,a,b\np,a,b\np,a\np,a,b\n",
                                "ragged.csv: not a readable CSV file: line 4 has 2 values, the header 3"),
    "misspelt column": ("typo.jsonl", jsonl({"prompt": "p", "chosen": "a", "rejectd": "b"}),
                        "typo.jsonl: missing column 'rejected' (did you mean 'rejectd'?); the columns are: prompt, "
                        "chosen, rejectd"),
}


@pytest.mark.parametrize("case", list(FAULTS))
def test_each_fault_is_one_line_naming_where(tmp_path, case):
    name, content, message = FAULTS[case]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "out"
    result = runner.invoke(app, ["audit", str(path), "--output", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert message in lines[0], result.stderr
    assert not out.exists()


def test_a_tool_call_may_omit_content(tmp_path):
    row = messages_row([{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f",
                                                                                               "arguments": {}}}]}])
    path = tmp_path / "calls.jsonl"
    path.write_text(jsonl(row))
    assert load_pairs(str(path)).table["chosen"].iloc[0] == row["chosen"]


def test_tool_arguments_whose_types_differ_are_scored_and_written_as_json_text(tmp_path):
    records = tool_records()[:2]
    records[1]["chosen"] = [tool_call("add", {"city": 5})]  # a string in the other row
    records[1]["tools"][0]["function"]["parameters"]["type"] = 7  # a string in the other row
    path = write(records, tmp_path / "mixed", "jsonl")
    assert load_pairs(str(path)).table["chosen"].tolist() == [r["chosen"] for r in records]
    result = runner.invoke(app, ["audit", str(path), "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    pairs = pd.read_parquet(tmp_path / "out" / "pairs.parquet")
    assert [json.loads(v) for v in pairs["chosen"]] == [r["chosen"] for r in records]
    assert [json.loads(v) for v in pairs["tools"]] == [r["tools"] for r in records]


def test_plain_text_and_plain_conversations_stay_in_arrow(tmp_path, monkeypatch):
    from prefdiag.data import readers

    def no_python_pass(*args, **kwargs):
        raise AssertionError("plain data must not be read again in Python")

    monkeypatch.setattr(readers, "_open_text", no_python_pass)  # the Python pass's only way into a file
    path = tmp_path / "plain.jsonl"
    path.write_text("".join(json.dumps({"id": i, "prompt": "p", "chosen": f"a{i}", "rejected": "b"}) + "\n"
                            for i in range(5)))  # fmt: skip
    table = load_pairs(str(path)).table
    assert table["pair_id"].tolist() == ["0", "1", "2", "3", "4"]  # integer ids: Arrow's text is the written one
    assert all(getattr(table[c].dtype, "storage", None) == "pyarrow" for c in ("prompt", "chosen", "rejected"))
    chat = tmp_path / "chat.jsonl"
    chat.write_text(jsonl(messages_row([{"role": "assistant", "content": "x"}])))
    assert all(isinstance(dtype, pd.ArrowDtype) for dtype in load_pairs(str(chat)).table.dtypes.iloc[1:])
