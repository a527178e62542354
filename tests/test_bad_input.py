"""Bad input never crashes and never half-writes: through the real CLI, each case exits 2 with a one-line message that
names the problem, no traceback, and nothing under --output."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from prefdiag.cli import app

runner = CliRunner()


GOOD = {"prompt": "Question: why?", "chosen": " Because.", "rejected": " No."}


def jsonl(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


# name -> (file name, content: text or a writer of the path, message expected on stderr)
DATA_CASES = {
    "missing file": ("absent.jsonl", None, "absent.jsonl: no such file or directory"),
    "empty file": ("empty.jsonl", "", "empty.jsonl: the file is empty"),
    "only blank lines": ("blank.jsonl", "\n  \n\n", "blank.jsonl: the file holds no rows"),
    "malformed JSON line": ("bad.jsonl", jsonl(GOOD, GOOD, '{"prompt": "p", "chosen": oops}', GOOD),
                            "bad.jsonl:3: malformed JSON"),
    "a JSON line that is not an object": ("array.jsonl", jsonl(GOOD, "[1, 2]"), "array.jsonl:2: expected a JSON "
                                                                               "object, got an array"),
    "malformed JSON file": ("bad.json", '[{"prompt": "p",\n "chosen": }]', "bad.json:2: malformed JSON"),
    "missing column": ("nocol.jsonl", jsonl({"prompt": "p", "answer": "a", "rejected": "b"}),
                       "missing column 'chosen'; the columns are: prompt, answer, rejected"),
    "wrong type in one row": ("int.jsonl", jsonl(GOOD, {**GOOD, "chosen": 5}),
                              "row 2, column 'chosen': expected a string or a list of {role, content} messages, "
                              "got int"),
    "wrong type in every row": ("ints.jsonl", jsonl({**GOOD, "rejected": 1}, {**GOOD, "rejected": 2}),
                                "row 1, column 'rejected': expected a string or a list of {role, content} "
                                "messages, got int"),
    "null value": ("null.jsonl", jsonl(GOOD, GOOD, {**GOOD, "prompt": None}),
                   "row 3, column 'prompt': expected a string, got null"),
    "messages mixed with strings": ("mixed.json", json.dumps([GOOD, {**GOOD, "chosen": [{"role": "assistant",
                                                                                        "content": "x"}]}]),
                                    "row 2, column 'chosen': expected a string like the first row, got a list "
                                    "of messages"),
    "a list that is not messages": ("list.jsonl", jsonl({**GOOD, "chosen": ["a"]}),
                                    "row 1, column 'chosen': expected a string or a list of {role, content} "
                                    "messages, got a list that is not {role, content} messages"),
    "multimodal content": ("mm.jsonl", jsonl({"chosen": [{"role": "assistant", "content": [{"type": "text",
                                                                                            "text": "hi"}]}],
                                              "rejected": [{"role": "assistant", "content": [{"type": "text",
                                                                                              "text": "yo"}]}]}),
                           "column 'chosen': message content is list<item: struct<type: string, text: string>>, "
                           "not text"),
    "unknown extension": ("pairs.txt", "hello", "pairs.txt: unknown file extension '.txt'; expected one of .csv, "
                                                ".json, .jsonl, .ndjson, .parquet"),
    "unreadable Parquet": ("broken.parquet", "PAR1 this is not parquet", "broken.parquet: not a readable Parquet "
                                                                         "file"),
    "Parquet without rows": ("zero.parquet", lambda p: pd.DataFrame({"chosen": [], "rejected": []}, dtype="str")
                             .to_parquet(p), "zero.parquet: the data holds no rows"),
    "Parquet with a null": ("null.parquet", lambda p: pd.DataFrame({"chosen": ["a", None], "rejected": ["b", "c"]})
                            .to_parquet(p), "row 2, column 'chosen': expected a string, got null"),
    "Parquet of numbers": ("num.parquet", lambda p: pd.DataFrame({"chosen": [1.5], "rejected": ["b"]}).to_parquet(p),
                           "row 1, column 'chosen': expected a string or a list of {role, content} messages, got "
                           "float"),
    "ragged CSV": ("ragged.csv", "prompt,chosen,rejected\np,a,b\np,a\n", "ragged.csv: not a readable CSV file"),
    "duplicate ids": ("dup.jsonl", jsonl({**GOOD, "id": 1}, {**GOOD, "id": 1}), "id column 'id' has duplicate "
                                                                                "value '1'"),
    "not a saved dataset": ("emptydir", lambda p: p.mkdir(), "emptydir: not a dataset saved with save_to_disk"),
}


def run_cli(args, out):
    result = runner.invoke(app, [str(a) for a in args] + ["--output", str(out)])
    return result


def assert_clean_usage_error(result, message, out):
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Error: "), result.stderr
    assert message in result.stderr.splitlines()[0], result.stderr
    assert "Traceback" not in result.output
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_is_a_usage_error_that_names_the_problem(tmp_path, case, monkeypatch):
    name, content, message = DATA_CASES[case]
    monkeypatch.chdir(tmp_path)
    path = tmp_path / name
    if callable(content):
        content(path)
    elif content is not None:
        path.write_text(content)
    out = tmp_path / "out"
    assert_clean_usage_error(run_cli(["audit", name], out), message, out)


@pytest.fixture(scope="module")
def other_vocab_model(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("other") / "other"
    LlamaForCausalLM(LlamaConfig(vocab_size=123, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_without_tokenizer(tmp_path_factory, model_dirs):
    import shutil

    path = tmp_path_factory.mktemp("notok") / "model"
    shutil.copytree(model_dirs["llama"], path)
    for file in path.iterdir():
        if "token" in file.name or file.name.endswith((".model", "merges.txt", "vocab.json")):
            file.unlink()
    return path


@pytest.mark.parametrize(
    "args,message",
    [
        (["compare", "{data}", "-r", "/nonexistent/model", "-p", "{pol}"], "does not exist"),
        (["compare", "{data}", "-r", "{ref}", "-p", "/nonexistent/policy"], "does not exist"),
        (["audit", "{data}", "-r", "{notok}"], "cannot load a tokenizer from"),
        (["compare", "{data}", "-r", "{ref}", "-p", "{other}"], "vocabulary"),
        (["compare", "{data}", "-r", "{ref}", "-p", "{pol}", "--beta", "-1"], "--beta must be > 0, got -1.0"),
        (["audit", "{data}", "-r", "{ref}", "--beta", "0"], "--beta must be > 0, got 0.0"),
        (["audit", "{data}", "-r", "{ref}", "--group-by", "nope"], "--group-by: no column 'nope'; the columns are:"),
        (["audit", "{data}", "--data-format", "hh"], "--data-format hh splits prompt-less HH transcripts"),
        (["audit", "{data}", "--data-format", "conversational"], "expected a JSON list of {role, content} messages"),
        (["audit", "{data}", "--chosen-column", "answer"], "missing column 'answer'; the columns are: id, prompt"),
        (["audit", "{data}", "--id-column", "uid"], "missing id column 'uid'"),
        (["audit", "{data}", "--prompt-column", "question"], "missing prompt column 'question'"),
    ],
)
def test_bad_models_and_options_are_usage_errors(model_dirs, pairs_file, other_vocab_model,
                                                 model_without_tokenizer, tmp_path, args, message):
    values = {"ref": model_dirs["llama"], "pol": model_dirs["llama-policy"], "data": pairs_file,
              "other": other_vocab_model, "notok": model_without_tokenizer}
    out = tmp_path / "out"
    result = run_cli([a.format(**values) for a in args] + ["--device", "cpu", "--no-cache"], out)
    assert_clean_usage_error(result, message, out)


def test_hh_format_on_pairs_without_a_shared_assistant_turn_names_the_row(tmp_path):
    path = tmp_path / "hh.jsonl"
    path.write_text(jsonl({"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"},
                          {"chosen": "\n\nHuman: x\n\nAssistant: a", "rejected": "\n\nHuman: y\n\nAssistant: b"}))
    out = tmp_path / "out"
    result = run_cli(["audit", path, "--data-format", "hh"], out)
    assert_clean_usage_error(result, "row 2: chosen and rejected share no '\\n\\nAssistant:' turn", out)
    auto = runner.invoke(app, ["audit", str(path), "-q", "-f", "json"])  # auto: not HH, so TRL's extract_prompt
    assert auto.exit_code == 0 and json.loads(auto.stdout)["provenance"]["dataset"]["prompt_split"] == (
        "extract_prompt")


def test_a_conversation_the_chat_template_rejects_names_its_row(model_dirs, tmp_path):
    from conftest import build_tokenizer

    strict = build_tokenizer("qwen")
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
        "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    strict.save_pretrained(tmp_path / "strict")
    good = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "yes"}],
            "rejected": [{"role": "assistant", "content": "no"}]}
    tool = {**good, "prompt": [{"role": "tool", "content": "42"}, {"role": "user", "content": "hi"}]}
    path = tmp_path / "chat.jsonl"
    path.write_text(jsonl(good, good, tool, good))
    out = tmp_path / "out"
    result = run_cli(["audit", path, "-r", model_dirs["qwen"], "--tokenizer", tmp_path / "strict", "--device", "cpu",
                      "--no-cache"], out)
    assert_clean_usage_error(result, "row 3: the chat template cannot render this conversation", out)
    assert "unknown role tool" in result.stderr


def test_bad_data_fails_before_any_model_is_loaded(tmp_path, monkeypatch):
    from prefdiag import models

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_model", no_loading)
    monkeypatch.setattr(models, "load_tokenizer", no_loading)
    path = tmp_path / "bad.jsonl"
    path.write_text(jsonl(GOOD, {**GOOD, "chosen": None}))
    out = tmp_path / "out"
    result = run_cli(["compare", path, "-r", "/nonexistent", "-p", "/nonexistent"], out)
    assert_clean_usage_error(result, "row 2, column 'chosen'", out)


@pytest.mark.parametrize("column,message", [
    ("tags", "--group-by: column 'tags' holds lists or objects; choose a column of plain values"),
    ("pair_id", "--group-by: column 'pair_id' has 1,001 distinct values; at most 1000 groups are allowed"),
])
def test_group_by_needs_a_column_of_few_plain_values(tmp_path, column, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(jsonl(*({**GOOD, "id": i, "tags": ["a"]} for i in range(1001))))
    out = tmp_path / "out"
    assert_clean_usage_error(run_cli(["audit", path, "--group-by", column], out), message, out)


def test_an_existing_output_directory_keeps_its_files_on_error(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_cli(["audit", tmp_path / "absent.jsonl"], out)
    assert result.exit_code == 2
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_one_line_reasons_keep_what_a_colon_announces():
    from prefdiag.errors import first_line

    announced = RuntimeError("backend='inductor' raised:\nCppCompileError: C++ compile error\n\nSet TORCH_LOGS=+dynamo")
    assert first_line(announced, with_type=True) == (
        "RuntimeError: backend='inductor' raised: CppCompileError: C++ compile error"
    )
    assert first_line(ValueError("bad value\nmore detail")) == "bad value"
    assert first_line(KeyError()) == "KeyError"
