"""Model-free audit at scale: generate N synthetic preference pairs (default 1,000,000) with planted identical,
near-identical, duplicate, conflicting, empty and length-skewed pairs, run ``prefdiag audit FILE --output DIR`` as a
subprocess, and report its wall time and peak RSS, and whether every planted problem was found.

    python benchmarks/bench_model_free.py                       # 1M pairs, JSONL
    python benchmarks/bench_model_free.py --n 200000 --format parquet
    python benchmarks/bench_model_free.py --keep /tmp/bench     # keep the data and the output (a second run with
                                                                # the same --keep, --n and --format reuses the data)

Peak RSS is the audit process's own ru_maxrss (Linux reports KiB). The data is generated in a separate process first,
so this script stays small when it starts the audit: Linux carries a parent's resident size into a forked child's
maximum, which would otherwise inflate the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

WORDS = np.array(
    (
        "the a an of to in is it that for on with as was by at be this are from or have not but what all were "
        "when we there can an your which their said if do will each about how up out them then she many some so "
        "these would other into has more her two like him see time could no make than first been its who now "
        "people my made over did down only way find use may water long little very after words called just "
        "where most know get through back much before go good new write our used me man too any day same right "
        "look think also around another came come work three word must because does part even place well such "
        "answer question model data paris london capital river mountain python code function return value"
    ).split()
)

PLANTED = ("identical", "near_identical", "duplicate", "conflict", "empty_response", "length_ratio")


def _texts(rng: np.random.Generator, n: int, low: int, high: int) -> list[str]:
    lengths = rng.integers(low, high, n)
    words = WORDS[rng.integers(0, len(WORDS), int(lengths.sum()))].tolist()
    out, start = [], 0
    for length in lengths.tolist():
        out.append(" ".join(words[start : start + length]))
        start += length
    return out


def generate(n: int, seed: int = 0) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """n pairs; about 0.5% of them carry each planted problem. Returns the table and the planted rows per check."""
    rng = np.random.default_rng(seed)
    prompt = _texts(rng, n, 8, 40)
    chosen = [w + "." for w in _texts(rng, n, 20, 60)]
    rejected = [w + "!" for w in _texts(rng, n, 20, 60)]  # at most 3x longer or shorter than chosen, in words
    for texts in (prompt, chosen, rejected):  # like real text, half the values hold a paragraph break
        for i in np.flatnonzero(rng.random(n) < 0.5).tolist():
            texts[i] = texts[i].replace(" ", "\n\n", 1)
    k = max(1, n // 200)
    rows = rng.permutation(n)
    names = ("identical", "near", "dup", "conf", "empty", "ratio")
    groups = {name: rows[i * k : (i + 1) * k] for i, name in enumerate(names)}
    for i in groups["identical"]:
        rejected[i] = "  " + chosen[i].replace(" ", "  ") + "\n"  # equal after whitespace normalisation
    for i in groups["near"]:
        rejected[i] = chosen[i][:-1] + "?"  # one character apart
    for i in groups["empty"]:
        rejected[i] = " "
    for i in groups["ratio"]:
        rejected[i] = "no thanks!"  # chosen has at least 20 words
    # duplicates: copy a source row over each planted row; conflicts: copy a source row, responses swapped
    dup_src, conf_src = rows[6 * k : 7 * k], rows[7 * k : 8 * k]
    for dst, src in zip(groups["dup"], dup_src):
        prompt[dst], chosen[dst], rejected[dst] = prompt[src], chosen[src], rejected[src]
    for dst, src in zip(groups["conf"], conf_src):
        prompt[dst], chosen[dst], rejected[dst] = prompt[src], rejected[src], chosen[src]
    table = pd.DataFrame(
        {
            "id": [f"p{i:07d}" for i in range(n)],
            "prompt": prompt,
            "chosen": chosen,
            "rejected": rejected,
            "source": rng.choice(["web", "chat", "code", "math"], n),
        }
    )
    planted = {
        "identical": groups["identical"],
        "near_identical": groups["near"],
        "duplicate": np.concatenate([groups["dup"], dup_src]),
        "conflict": np.concatenate([groups["conf"], conf_src]),
        "empty_response": groups["empty"],
        "length_ratio": groups["ratio"],
    }
    return table, planted


def write(table: pd.DataFrame, path: Path) -> None:
    if path.suffix == ".parquet":
        table.to_parquet(path, index=False)
    else:
        with path.open("w", encoding="utf-8") as handle:
            for record in table.to_dict("records"):
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def run_audit(data: Path, out: Path, extra: list[str]) -> tuple[float, float, float, subprocess.CompletedProcess]:
    """Run the real CLI in a subprocess; returns (wall s, CPU s, peak RSS MiB) of that child, and the process."""
    command = [sys.executable, "-m", "prefdiag", "audit", str(data), "--output", str(out), "--quiet", *extra]
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own resource usage
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        stderr.seek(0)
        done = subprocess.CompletedProcess(command, process.returncode, stdout.read(), stderr.read())
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl")
    parser.add_argument("--keep", type=Path, help="keep the data and the audit output in this directory")
    parser.add_argument("--group-by", default="source", help="column for --group-by ('' for none)")
    parser.add_argument("--generate-only", type=Path, help=argparse.SUPPRESS)  # internal: write data, planted rows
    args = parser.parse_args()
    if args.generate_only:
        table, planted = generate(args.n)
        write(table, args.generate_only)
        np.savez(args.generate_only.with_suffix(".npz"), **planted)
        return

    root = args.keep or Path(tempfile.mkdtemp(prefix="prefdiag-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    data, out = root / f"pairs-{args.n}.{args.format}", root / "out"
    planted_file = data.with_suffix(".npz")
    if data.exists() and planted_file.exists():
        print(f"reusing {data}")
    else:
        t0 = time.perf_counter()
        command = [sys.executable, __file__, "--n", str(args.n), "--generate-only", str(data)]
        subprocess.run(command, check=True)
        print(f"generated {args.n:,} pairs in {time.perf_counter() - t0:.0f} s")
    planted = dict(np.load(planted_file))
    size_mb = data.stat().st_size / 2**20
    shutil.rmtree(out, ignore_errors=True)
    extra = ["--group-by", args.group_by] if args.group_by else []
    load = os.getloadavg()[0]
    wall, cpu, peak_mb, done = run_audit(data, out, extra)
    if done.returncode != 0:
        print(done.stderr, file=sys.stderr)
        raise SystemExit(f"prefdiag audit failed with exit code {done.returncode}")
    pairs = pd.read_parquet(out / "pairs.parquet", columns=list(PLANTED))
    missed = {name: int((~pairs[name].to_numpy()[rows]).sum()) for name, rows in planted.items()}
    summary = json.loads((out / "summary.json").read_text())
    print(f"prefdiag audit: {wall:.1f} s wall, {cpu:.1f} s CPU, peak RSS {peak_mb:,.0f} MiB, data file "
          f"{size_mb:,.0f} MiB, {os.cpu_count()} CPUs (load average {load:.1f} at the start)")
    print("flag counts:", {name: summary[f"n_{name}"] for name in PLANTED})
    print("planted pairs missed:", missed)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
