"""junit.xml: one testcase per gate rule, so CI systems (GitHub, GitLab, Jenkins) show the gate natively.

A failed error-severity rule gets a <failure>; a failed warn rule passes, with the warning in <system-out>. With no
rule there is one skipped testcase, the verdict ("no gate rules were set"), so the file is never empty. Every text
goes through clean_text: control characters and lone surrogates (not allowed in XML) are shown as pictures.
Shape: <testsuites><testsuite name tests failures errors skipped time timestamp><properties/><testcase classname
name time><failure message type>...</failure></testcase></testsuite></testsuites>.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

from prefdiag.reports.common import clean_text, gate_headline, gate_rows

NAME_LIMIT = 300  # characters of a testcase name (a rule on a long group value)


def render_junit(summary: dict[str, Any]) -> str:
    """The junit.xml text for the gate of a summary (one skipped verdict testcase when no rule was set)."""
    command = str(summary.get("command") or "run")
    rows = gate_rows(summary)
    failures = sum(r.status == "fail" for r in rows)
    created = (summary.get("provenance") or {}).get("created_at", "")
    tests, skipped = max(len(rows), 1), 0 if rows else 1
    suites = ET.Element("testsuites", name="prefdiag", tests=str(tests), failures=str(failures), errors="0",
                        time="0")  # fmt: skip
    suite = ET.SubElement(
        suites, "testsuite", name=_xml(f"prefdiag.gate.{command}"), tests=str(tests), failures=str(failures),
        errors="0", skipped=str(skipped), time="0", timestamp=_xml(str(created)[:19]),
    )  # fmt: skip
    properties = ET.SubElement(suite, "properties")
    verdict = summary.get("verdict") or {}
    for name, value in (
        ("command", command),
        ("n_pairs", summary.get("n_pairs")),
        ("verdict_level", verdict.get("level")),
        ("verdict", verdict.get("text")),
        ("gate", gate_headline(summary)[1]),
    ):
        if value is not None:
            ET.SubElement(properties, "property", name=name, value=_xml(str(value)))
    classname = _xml(f"prefdiag.gate.{command}")
    for row in rows:
        name = f"{row.metric} {row.condition}" + (" [warn]" if row.severity == "warn" else "")
        case = ET.SubElement(suite, "testcase", classname=classname, name=_xml(name, NAME_LIMIT), time="0")
        if row.status == "fail":
            failure = ET.SubElement(case, "failure", message=_xml(row.message), type="GateFailure")
            failure.text = _xml(f"{row.message} (severity {row.severity}, from {row.source})")
        elif row.status == "warn":
            ET.SubElement(case, "system-out").text = _xml(f"warning: {row.message} (from {row.source})")
    if not rows:
        level = verdict.get("level", "ok")
        case = ET.SubElement(suite, "testcase", classname=classname, name=f"verdict: {_xml(str(level))}", time="0")
        ET.SubElement(case, "skipped", message="no gate rules were set")
        lines = [f"{f['level']}: {f['text']}" for f in verdict.get("findings") or []] or [str(verdict.get("text", ""))]
        ET.SubElement(case, "system-out").text = _xml("\n".join(lines))
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def _xml(text: str, limit: int | None = None) -> str:
    """Text XML 1.0 can hold (no control character, no lone surrogate), cut at ``limit`` characters."""
    text = clean_text(text, bidi=True)
    return text if limit is None or len(text) <= limit else text[: limit - 1] + "…"
