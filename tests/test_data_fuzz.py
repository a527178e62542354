"""Random malformed rows in every input format, through the real CLI (a model-free audit): each run either goes
through normally or exits 2 with one line on stderr, never a traceback, and --output stays untouched on exit 2.
A seeded generator (the same cases every run), about 100 cases."""

from __future__ import annotations

import gzip
import json
import random

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from prefdiag.cli import app

runner = CliRunner()
GOOD = {"id": "a", "prompt": "Question: why?", "chosen": " Because.", "rejected": " No.", "source": "x"}
MESSAGES = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "yes"}],
            "rejected": [{"role": "assistant", "content": "no"}]}  # fmt: skip


def odd_value(rng: random.Random):
    """A value that may or may not belong in a pairs column."""
    choices = [
        None, 0, 1.5, float("nan"), True, "", " ", "\x00\x1b[31m\u202e", "x" * rng.randint(1, 3000), [], ["a"], {},
        {"role": "user"}, [{"role": "assistant"}], [{"content": "x"}], [{"role": "assistant", "content": None}],
        [{"role": "assistant", "content": 3}], [{"role": 5, "content": "x"}],
        [{"role": "assistant", "content": [{"type": "text", "text": "x"}]}],
        [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {"k": 1}}}]}],
        [{"role": "assistant", "content": "ok"}], "\n\nHuman: hi\n\nAssistant: yo", 10**30, -1, "1", "\ud800",
    ]
    return rng.choice(choices)


def malformed_rows(rng: random.Random) -> list[dict]:
    base = MESSAGES if rng.random() < 0.3 else GOOD
    rows = [{**base, "id": f"r{i}"} for i in range(rng.randint(1, 6))]
    for _ in range(rng.randint(1, 3)):
        row = rng.choice(rows)
        key = rng.choice(["id", "prompt", "chosen", "rejected", "source", "extra"])
        if rng.random() < 0.2:
            row.pop(key, None)
        else:
            row[key] = odd_value(rng)
    return rows


def write_case(rows: list[dict], fmt: str, path, rng: random.Random):
    """The rows in format fmt; None when that format cannot hold them at all (the case is skipped)."""
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if fmt == "jsonl":
        path = path.with_suffix(".jsonl")
        path.write_text(text)
    elif fmt == "jsonl.gz":
        path = path.with_suffix(".jsonl.gz")
        data = gzip.compress(text.encode())
        path.write_bytes(data[: rng.randint(10, len(data))] if rng.random() < 0.3 else data)
    elif fmt == "json":
        path = path.with_suffix(".json")
        path.write_text(json.dumps(rows))
    elif fmt == "bytes":  # valid JSON Lines with a few bytes flipped
        path = path.with_suffix(".jsonl")
        data = bytearray(text.encode())
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        path.write_bytes(bytes(data))
    elif fmt == "csv":
        path = path.with_suffix(".csv")
        names = list(dict.fromkeys(k for r in rows for k in r))
        lines = [",".join(names)]
        for r in rows:
            cells = ['"' + (json.dumps(r[k]) if not isinstance(r.get(k), str) else r[k]).replace('"', '""') + '"'
                     for k in names if k in r]  # fmt: skip
            lines.append(",".join(cells))
        path.write_text("\n".join(lines) + "\n", errors="surrogatepass")
    elif fmt == "parquet":
        path = path.with_suffix(".parquet")
        try:
            pq.write_table(pa.Table.from_pylist(rows), path)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            return None
    return path


FORMATS = ["jsonl", "jsonl.gz", "json", "bytes", "csv", "parquet"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_malformed_rows_exit_2_with_one_line_or_run_normally(tmp_path, fmt):
    rng = random.Random(f"prefdiag-fuzz-{fmt}")
    for case in range(16):
        rows = malformed_rows(rng)
        path = write_case(rows, fmt, tmp_path / f"case{case}", rng)
        if path is None:
            continue
        out = tmp_path / f"out{case}"
        out.mkdir()
        (out / "previous.txt").write_text("an earlier run")
        result = runner.invoke(app, ["audit", str(path), "--output", str(out)])
        shown = f"{fmt} case {case}: {rows!r}\n{result.output}"
        assert "Traceback" not in result.output and result.exc_info[0] in (SystemExit, None), shown
        assert result.exit_code in (0, 2), shown
        if result.exit_code == 2:
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("Error: "), shown
            assert sorted(p.name for p in out.iterdir()) == ["previous.txt"], shown
            assert (out / "previous.txt").read_text() == "an earlier run"
        else:
            assert (out / "pairs.parquet").exists(), shown
            assert len(pd.read_parquet(out / "pairs.parquet")) == len(rows), shown
