"""What reaches the chat template: per-row tools and chat_template_kwargs exactly as TRL 1.x's DPOTrainer passes
them (checked against TRL's own preprocessing), and a Jinja file given with --chat-template."""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import pytest
from conftest import build_tokenizer

from prefdiag.chat_templates import load_chat_template, use_chat_template
from prefdiag.errors import DataError
from prefdiag.tokenization import tokenization_key, tokenize_pairs

# A Qwen2.5-style template: tools announced in the system turn, tool calls with their arguments as JSON, tool
# results as user turns, and a template variable (``persona``) that only chat_template_kwargs can set.
TOOL_TEMPLATE = """
{%- if tools %}<|im_start|>system
{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% else %}You are a helpful assistant.{% endif %}
{% if persona is defined %}You are {{ persona }}.{% endif %}

# Tools

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>

For each function call, return a json object with name and arguments in <tool_call></tool_call> tags.<|im_end|>
{% else %}<|im_start|>system
{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% else %}You are a helpful assistant.{% endif %}
{% if persona is defined %}You are {{ persona }}.{% endif %}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' and loop.first %}
{%- elif message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant
{% if message.content %}{{ message.content }}{% endif %}
{%- for call in message.tool_calls %}{% set call = call.function if call.function is defined else call %}
<tool_call>
{"name": "{{ call.name }}", "arguments": {{ call.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}
"""

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}, "unit": {"type": "string"}},
                                                "required": ["city"]}}}
ADD = {"type": "function", "function": {"name": "add", "description": "a plus b",
                                        "parameters": {"type": "object", "properties": {
                                            "a": {"type": "number"}, "b": {"type": "number"}}}}}


def _call(name: str, arguments: dict) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def tool_rows() -> list[dict]:
    """Tool-calling conversations whose tool-call arguments differ in keys from row to row."""
    return [
        {  # the answer calls a tool; tools as a list
            "prompt": [{"role": "user", "content": "what is the weather in paris"}],
            "chosen": [{"role": "assistant", "tool_calls": [_call("get_weather", {"city": "paris"})]}],
            "rejected": [{"role": "assistant", "content": "it is sunny"}],
            "tools": [WEATHER],
        },
        {  # a finished tool round trip in the prompt; tools as the JSON string TRL decodes; template kwargs
            "prompt": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "one plus two"},
                {"role": "assistant", "tool_calls": [_call("add", {"a": 1, "b": 2})]},
                {"role": "tool", "content": "3"},
            ],
            "chosen": [{"role": "assistant", "content": "three"}],
            "rejected": [{"role": "assistant", "content": "four"}],
            "tools": json.dumps([ADD, WEATHER]),
            "chat_template_kwargs": {"persona": "a calculator"},
        },
        {  # other argument keys for the same tool, in another order
            "prompt": [{"role": "user", "content": "weather in rome in celsius"}],
            "chosen": [{"role": "assistant", "tool_calls": [_call("get_weather", {"unit": "c", "city": "rome"})]}],
            "rejected": [{"role": "assistant", "tool_calls": [_call("get_weather", {"city": "london"})]}],
            "tools": [WEATHER, ADD],
        },
        {  # template kwargs without tools
            "prompt": [{"role": "user", "content": "hi"}],
            "chosen": [{"role": "assistant", "content": "hello"}],
            "rejected": [{"role": "assistant", "content": "go away"}],
            "chat_template_kwargs": {"persona": "polite"},
        },
        {  # neither column
            "prompt": [{"role": "user", "content": "yes or no"}],
            "chosen": [{"role": "assistant", "content": "yes"}],
            "rejected": [{"role": "assistant", "content": "no"}],
        },
    ]


class _Rows(list):
    """The rows as TRL's ``_prepare_dataset`` walks them (``map``/``filter`` over plain dicts), so TRL's own
    preprocessing sees each row exactly as written (an Arrow table would add the missing argument keys)."""

    def map(self, fn, fn_kwargs=None, **_):
        return _Rows({**row, **fn(dict(row), **(fn_kwargs or {}))} for row in self)

    def filter(self, fn, **_):
        return _Rows(row for row in self if fn(row))


def trl_prepared(tokenizer, rows: list[dict]) -> list[dict]:
    """TRL 1.x DPOTrainer's preprocessing of the rows (its own ``_prepare_dataset``, default settings)."""
    from trl import DPOTrainer

    trainer = SimpleNamespace(_tokenizer=tokenizer)
    args = SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    return list(DPOTrainer._prepare_dataset(trainer, _Rows(rows), tokenizer, args, "eval"))


def tool_tokenizer():
    tokenizer = build_tokenizer("qwen")
    tokenizer.chat_template = TOOL_TEMPLATE
    return tokenizer


def _ours(tokenizer, rows, **extra):
    return tokenize_pairs(tokenizer, [r["prompt"] for r in rows], [r["chosen"] for r in rows],
                          [r["rejected"] for r in rows], **extra)


def _columns(rows):
    return {"tools": [r.get("tools") for r in rows], "template_kwargs": [r.get("chat_template_kwargs") for r in rows]}


def test_tools_and_template_kwargs_reach_the_template_as_trl_passes_them():
    tokenizer = tool_tokenizer()
    rows = tool_rows()
    expected = trl_prepared(tokenizer, rows)
    ours = _ours(tokenizer, rows, **_columns(rows))
    for i, ex in enumerate(expected):
        assert ours.prompt_ids[i] == ex["prompt_ids"], i
        assert ours.chosen_ids[i] == ex["chosen_ids"], i
        assert ours.rejected_ids[i] == ex["rejected_ids"], i
    assert ours.settings["rows_with_tools"] == 3 and ours.settings["rows_with_chat_template_kwargs"] == 2
    # Without the columns (the behaviour before) the rows that carry them are scored after another prompt.
    plain = _ours(tokenizer, rows)
    assert [plain.prompt_ids[i] != ex["prompt_ids"] for i, ex in enumerate(expected)] == [True] * 4 + [False]
    assert "<tools>" in tokenizer.decode(ours.prompt_ids[0]) and "calculator" in tokenizer.decode(ours.prompt_ids[1])


def test_tool_call_arguments_render_with_their_own_keys_only():
    tokenizer = tool_tokenizer()
    rows = tool_rows()
    ours = _ours(tokenizer, rows, **_columns(rows))
    first = tokenizer.decode(ours.chosen_ids[0])
    third = tokenizer.decode(ours.chosen_ids[2])
    assert '"arguments": {"city": "paris"}' in first and "unit" not in first
    assert '"arguments": {"unit": "c", "city": "rome"}' in third


def test_template_inputs_are_part_of_the_token_cache_key():
    tokenizer = tool_tokenizer()
    rows = tool_rows()
    texts = ([r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows])
    columns = _columns(rows)
    key = tokenization_key(tokenizer, *texts, **columns)
    assert key == tokenization_key(tokenizer, *texts, **_columns(tool_rows()))
    other_tools = dict(columns, tools=[None] + columns["tools"][1:])
    other_kwargs = dict(columns, template_kwargs=[None] * len(rows))
    keys = {key, tokenization_key(tokenizer, *texts, **other_tools),
            tokenization_key(tokenizer, *texts, **other_kwargs), tokenization_key(tokenizer, *texts),
            tokenization_key(tokenizer, *texts, documents=[[{"t": "x"}]] * 5)}
    assert len(keys) == 5


def test_documents_are_not_rendered_as_trl_does_not_pass_them():
    tokenizer = tool_tokenizer()
    rows = tool_rows()
    docs = [[{"title": "a", "text": "b"}], None, None, [], None]
    with_docs = _ours(tokenizer, rows, documents=docs)
    assert with_docs.prompt_ids == _ours(tokenizer, rows).prompt_ids
    assert with_docs.settings["documents_not_rendered"] == 1


@pytest.mark.parametrize("column, value, message", [
    ("tools", "[not json", "row 2, column 'tools': not valid JSON"),
    ("tools", {"name": "f"}, "row 2, column 'tools': expected a list"),
    ("template_kwargs", ["persona"], "row 2, column 'chat_template_kwargs': expected a mapping"),
])
def test_bad_template_inputs_name_the_row_and_column(column, value, message):
    tokenizer = tool_tokenizer()
    rows = tool_rows()[:3]
    columns = {column: [None, value, None]}
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        _ours(tokenizer, rows, **columns)


def test_a_template_argument_the_template_rejects_names_the_row():
    tokenizer = tool_tokenizer()
    rows = tool_rows()[:2]
    with pytest.raises(DataError, match="row 2: the chat template cannot render"):
        _ours(tokenizer, rows, template_kwargs=[None, {"add_generation_prompt": False}])


def test_chat_template_file_applies_and_is_recorded(tmp_path):
    path = tmp_path / "tools.jinja"
    path.write_text(TOOL_TEMPLATE)
    tokenizer = build_tokenizer("gpt2")  # a tokenizer without a chat template
    assert not tokenizer.chat_template
    digest = use_chat_template(tokenizer, path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    rows = tool_rows()
    ours = _ours(tokenizer, rows, **_columns(rows))
    assert ours.settings["chat_template_sha256"] == digest
    assert ours.prompt_ids == [ex["prompt_ids"] for ex in trl_prepared(tokenizer, rows)]
    texts = ([r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows])
    key = tokenization_key(tokenizer, *texts)
    path.write_text(TOOL_TEMPLATE.replace("helpful", "useful"))
    use_chat_template(tokenizer, path)
    assert tokenization_key(tokenizer, *texts) != key


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    (b"\xff\xfe{{ x }}", "line 1: not UTF-8"),
    ("{% for m in messages %}\n{{ m.content }}\n{% endfor\n", "line 3: invalid Jinja"),
    ("ok {{ x }}\n\n{% if %}", "line 3: invalid Jinja"),
    ("  \n", "the file is empty"),
])
def test_bad_chat_template_files_name_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "template.jinja"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(DataError) as info:
        load_chat_template(path)
    assert str(path) in str(info.value) and message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_directory_is_not_a_chat_template(tmp_path):
    with pytest.raises(DataError, match="cannot be read"):
        load_chat_template(tmp_path)


def test_tools_as_json_strings_through_trls_dpotrainer_on_a_dataset(tmp_path):
    """The same through a real DPOTrainer on a datasets.Dataset (tools as JSON strings, as Arrow keeps them whole,
    and chat_template_kwargs in every row, as TRL 1.x's ``**example.get(...)`` needs)."""
    from datasets import Dataset
    from oracle import make_trainer

    tokenizer = tool_tokenizer()
    picked = [tool_rows()[i] for i in (0, 3, 4)]  # one shape of tool-call arguments: Arrow adds no keys to it
    rows = [dict(r, tools=json.dumps(r.get("tools", [])), chat_template_kwargs={"persona": f"helper {i}"})
            for i, r in enumerate(picked)]
    columns = ("prompt", "chosen", "rejected", "tools", "chat_template_kwargs")
    dataset = Dataset.from_list([{k: r[k] for k in columns} for r in rows])
    expected = [dict(ex) for ex in make_trainer(tokenizer, dataset, tmp_path).eval_dataset]
    ours = _ours(tokenizer, rows, **_columns(rows))
    assert ours.prompt_ids == [ex["prompt_ids"] for ex in expected]
    assert ours.chosen_ids == [ex["chosen_ids"] for ex in expected]
    assert ours.rejected_ids == [ex["rejected_ids"] for ex in expected]
    assert ["<tools>" in tokenizer.decode(p) for p in ours.prompt_ids] == [True, False, False]  # "[]": no preamble
    assert all(f"helper {i}" in tokenizer.decode(p) for i, p in enumerate(ours.prompt_ids))


def test_template_columns_of_a_pairs_table_and_the_notes():
    import pandas as pd

    from prefdiag.tokenization import settings_notes, template_columns

    rows = tool_rows()
    table = pd.DataFrame({"prompt": [r["prompt"] for r in rows], "tools": [r.get("tools") for r in rows]})
    columns = template_columns(table)
    assert columns == {"tools": [r.get("tools") for r in rows], "documents": None, "template_kwargs": None}
    assert settings_notes({"n_over_trl_default_max_length": 0, "documents_not_rendered": 0}) == []
    notes = settings_notes({"n_over_trl_default_max_length": 3, "documents_not_rendered": 1})
    assert notes[0].startswith("3 pairs exceed 1024 tokens") and notes[0].endswith("pass --max-length 1024 to match it")
    assert notes[1].startswith("1 row has a documents column")
