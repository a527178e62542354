"""junit.xml: one testcase per gate rule, so CI systems (GitHub, GitLab, Jenkins) show the gate natively.

A failed error-severity rule gets a <failure>; a failed warn rule passes, with the warning in <system-out>.
Shape: <testsuites><testsuite name tests failures errors skipped time timestamp><properties/><testcase classname
name time><failure message type>...</failure></testcase></testsuite></testsuites>.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

from prefdiag.reports.common import gate_headline, gate_rows


def render_junit(summary: dict[str, Any]) -> str:
    """The junit.xml text for the gate of a summary (a suite with no testcase when no rule was set)."""
    command = str(summary.get("command") or "run")
    rows = gate_rows(summary)
    failures = sum(r.status == "fail" for r in rows)
    created = (summary.get("provenance") or {}).get("created_at", "")
    suites = ET.Element("testsuites", name="prefdiag", tests=str(len(rows)), failures=str(failures), errors="0",
                        time="0")  # fmt: skip
    suite = ET.SubElement(
        suites, "testsuite", name=f"prefdiag.gate.{command}", tests=str(len(rows)), failures=str(failures),
        errors="0", skipped="0", time="0", timestamp=str(created)[:19],
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
            ET.SubElement(properties, "property", name=name, value=str(value))
    for row in rows:
        name = f"{row.metric} {row.condition}" + (" [warn]" if row.severity == "warn" else "")
        case = ET.SubElement(suite, "testcase", classname=f"prefdiag.gate.{command}", name=name, time="0")
        if row.status == "fail":
            failure = ET.SubElement(case, "failure", message=row.message, type="GateFailure")
            failure.text = f"{row.message} (severity {row.severity}, from {row.source})"
        elif row.status == "warn":
            ET.SubElement(case, "system-out").text = f"warning: {row.message} (from {row.source})"
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"
