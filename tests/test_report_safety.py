"""Reports stay valid and readable whatever bytes the data holds: control characters, lone surrogates,
right-to-left controls and 100 kB strings in pair ids, prompts, responses and group values."""

from __future__ import annotations

import io
import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import numpy as np
import pandas as pd
from rich.console import Console
from typer.testing import CliRunner

from prefdiag import gate
from prefdiag.cli import app
from prefdiag.diagnostics import add_pair_metrics, summarize, summarize_groups, verdict
from prefdiag.reports.html import render_html
from prefdiag.reports.junit import render_junit
from prefdiag.reports.markdown import render_markdown
from prefdiag.reports.terminal import print_report

RLO, RLM = "\u202e", "\u200f"
HOSTILE = ["ctl\x01\x07\x1b[31m\x7f\x85end", "lone \ud800 surrogate", f"{RLO}desrever{RLM} |x|",
           "long " + "y" * 100_000]
CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


def hostile_run():
    n = len(HOSTILE)
    text = pd.Series(HOSTILE, dtype=object)  # object columns: Arrow-backed strings cannot hold a lone surrogate
    table = pd.DataFrame({
        "pair_id": text, "prompt_tokens": [3] * n, "chosen_tokens": [4] * n, "rejected_tokens": [4] * n,
        "ref_chosen_logp": [-5.0, -6, -5, -7], "ref_rejected_logp": [-6.0, -5, -4, -6],
        "policy_chosen_logp": [-4.0, -7, -6, -5], "policy_rejected_logp": [-7.0, -4, -3, -8],
        "prompt": text, "chosen": text[::-1].reset_index(drop=True), "rejected": text, "source": text,
        "identical": [True, False, False, False],
    })  # fmt: skip
    table = add_pair_metrics(table, 0.1)
    summary = {"command": "compare", **summarize(table, 0.1)}
    summary["verdict"] = verdict(summary)
    summary["groups"] = summarize_groups(table, "source", 0.1)
    gate.apply(summary, [gate.Rule("groups.*.ranking_accuracy", "min", 0.9), gate.Rule("n_pairs", "min", 1)])
    return table, summary


def test_junit_is_valid_xml_whatever_the_group_values_hold():
    """Failed before: a control character in a group value went into a testcase name: not well-formed XML."""
    _, summary = hostile_run()
    text = render_junit(summary)
    assert not CONTROL.search(text)
    text.encode("utf-8")  # no lone surrogate
    cases = ET.fromstring(text).find("testsuite").findall("testcase")
    assert len(cases) == 5 and all(len(c.get("name")) <= 300 for c in cases)
    assert any("␁␇␛[31m␡<U+0085>end" in c.get("name") for c in cases)  # shown, not dropped
    assert any("<U+202E>desrever<U+200F>" in c.get("name") for c in cases)


class _Balance(HTMLParser):
    VOID = {"meta", "br", "img", "input", "link", "hr", "rect", "line", "circle", "path"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        pass

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append((tag, self.stack[-3:]))
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def test_html_stays_valid_and_bounded_whatever_the_text_holds():
    table, summary = hostile_run()
    html = render_html(table, summary)
    html.encode("utf-8")  # failed before: a lone surrogate could not be written as UTF-8
    assert not CONTROL.search(html)
    parser = _Balance()
    parser.feed(html)
    assert parser.errors == [] and parser.stack == []
    assert len(html) < 200_000  # the 100 kB values are cut (4,000 characters of text, 80 of an id)
    # A right-to-left override cannot reorder the page: in an id it is shown as its code point, in the text it
    # stays (the data as written) inside its own <pre>, which isolates it.
    assert '<bdi class="id">&lt;U+202E&gt;desrever' in html
    assert re.search("<pre>\u202edesrever\u200f [|]x[|]</pre>", html) and "unicode-bidi: isolate" in html
    assert "more characters]" in html


def test_markdown_and_terminal_rows_keep_their_shape():
    table, summary = hostile_run()
    report = render_markdown(table, summary)
    report.encode("utf-8")
    assert not CONTROL.search(report) and RLO not in report
    tables, block = [], []
    for line in report.splitlines() + [""]:
        if line.startswith("|"):
            block.append(len(re.findall(r"(?<!\\)\|", line)))  # cells: unescaped pipes
        elif block:
            tables.append(block)
            block = []
    assert len(tables) >= 4 and all(len(set(cells)) == 1 for cells in tables), tables
    assert "desrever" in report
    buffer = io.StringIO()
    print_report(Console(file=buffer, width=80, color_system=None, force_terminal=False), table, summary, 10)
    text = buffer.getvalue()
    assert not CONTROL.search(text.replace("\n", "")) and RLO not in text
    assert max(map(len, text.splitlines())) <= 80
    assert "<U+202E>" in text


def test_control_characters_in_group_values_through_the_cli(model_dirs, tmp_path):
    rows = [{"prompt": f"Q{i}: two plus {i}?", "chosen": f" {2 + i}.", "rejected": " no.",
             "source": ["web\x01", "bo\x1bok", f"{RLO}rtl"][i % 3]} for i in range(6)]  # fmt: skip
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(app, ["compare", str(data), "-r", str(model_dirs["llama"]), "-p",
                                      str(model_dirs["llama-policy"]), "--device", "cpu", "-q", "-o",
                                      str(tmp_path / "o"), "--group-by", "source", "--min",
                                      "groups.*.ranking_accuracy=0"])  # fmt: skip
    assert result.exit_code == 0, result.output
    root = ET.parse(tmp_path / "o" / "junit.xml").getroot()  # failed before: not well-formed
    names = [c.get("name") for c in root.iter("testcase")]
    assert len(names) == 3 and any("web␁" in n for n in names)
    parser = _Balance()
    parser.feed((tmp_path / "o" / "report.html").read_text(encoding="utf-8"))
    assert parser.errors == []
    assert np.isfinite(json.loads((tmp_path / "o" / "summary.json").read_text())["n_pairs"])
