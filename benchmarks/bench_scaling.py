"""Data-parallel scaling (issue 13): the same ``prefdiag compare`` job in 1, 2, 3 ... CPU processes under torchrun.

Each run is a whole process tree timed with ``time.perf_counter`` around ``subprocess.run``, with a fresh, empty cache
directory (so each run tokenizes, scores and writes its cache shards as a first run does), after one untimed warm-up
run (page cache, bytecode): the times are scoring plus the fixed costs every rank pays (imports, tokenization, model
loads). Each process gets ``--threads`` torch threads
(default: the machine's cores divided by the largest process count, so every run uses the same cores at most) and
runs gloo on the CPU. The tables of every run are checked against the single process (same rows and order, flags,
log-probs to 1e-5 relative) before any time is reported.

Examples::

    python benchmarks/bench_scaling.py --tiny                           # seconds: validates the harness
    python benchmarks/bench_scaling.py --processes 1,2,3 --repeat 8     # sample data x 8, the integrator's run
    python benchmarks/bench_scaling.py --data pairs.jsonl -r REF -p POLICY --processes 1,2,4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
LOGP_COLUMNS = ["ref_chosen_logp", "ref_rejected_logp", "policy_chosen_logp", "policy_rejected_logp"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_data(source: Path, repeat: int, limit: int | None, out: Path) -> Path:
    """``source``'s pairs (the first ``limit``), repeated ``repeat`` times with distinct prompts and ids."""
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()][:limit]
    with out.open("w") as handle:
        for k in range(repeat):
            for i, row in enumerate(rows):
                copy = {**row, "id": f"{row.get('id', i)}-{k}"}
                if k:
                    copy["prompt"] = f"{k}. {row['prompt']}" if isinstance(row["prompt"], str) else row["prompt"]
                handle.write(json.dumps(copy) + "\n")
    return out


def command(nproc: int, args: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "prefdiag", *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            f"--master-port={_free_port()}", "-m", "prefdiag", *args]  # fmt: skip


def run(nproc: int, args: list[str], env: dict[str, str], cache: Path) -> float:
    env = {**env, "PREFDIAG_CACHE_DIR": str(cache)}
    start = time.perf_counter()
    done = subprocess.run(command(nproc, args), env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{nproc} processes failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return seconds


def same_table(expected: Path, got: Path) -> None:
    a, b = pd.read_parquet(expected / "pairs.parquet"), pd.read_parquet(got / "pairs.parquet")
    if a["pair_id"].tolist() != b["pair_id"].tolist():
        raise SystemExit(f"{got}: rows differ from the single process")
    for column in a.columns:
        if column in LOGP_COLUMNS:
            np.testing.assert_allclose(b[column], a[column], rtol=1e-5, err_msg=f"{got}: {column}")
        elif a[column].dtype == bool:
            if not a[column].equals(b[column]):
                raise SystemExit(f"{got}: flag {column} differs from the single process")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "sample_data" / "pairs.jsonl")
    parser.add_argument("-r", "--reference", default=str(ROOT / "sample_data" / "models" / "reference"))
    parser.add_argument("-p", "--policy", default=str(ROOT / "sample_data" / "models" / "policy"))
    parser.add_argument("--processes", default="1,2,3", help="comma-separated process counts")
    parser.add_argument("--repeat", type=int, default=4, help="the data repeated this many times (distinct prompts)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N pairs of --data")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process")
    parser.add_argument("--trials", type=int, default=1, help="timed runs per process count (the fastest is kept)")
    parser.add_argument("--tiny", action="store_true", help="40 pairs, processes 1,2: checks the harness only")
    parser.add_argument("--work", type=Path, default=None, help="where data and outputs go (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None)
    ns = parser.parse_args(argv)
    if ns.tiny:
        ns.limit, ns.repeat, ns.processes = 40, 1, "1,2"
    counts = [int(x) for x in ns.processes.split(",")]
    threads = ns.threads or max(1, (os.cpu_count() or 1) // max(counts))
    work = ns.work or Path(tempfile.mkdtemp(prefix="prefdiag-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    data = make_data(ns.data, ns.repeat, ns.limit, work / "pairs.jsonl")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip

    def args(out: Path) -> list[str]:
        return ["compare", str(data), "-r", ns.reference, "-p", ns.policy, "--dtype", "float32", "--device", "cpu",
                "-q", "--format", "json", "-o", str(out)]  # fmt: skip

    import shutil

    def fresh(name: str) -> Path:
        shutil.rmtree(work / name, ignore_errors=True)
        return work / name

    run(1, args(fresh("warmup")), env, fresh("cache-warmup"))  # untimed
    results = []
    for nproc in counts:
        seconds = min(run(nproc, args(fresh(f"out-{nproc}")), env, fresh(f"cache-{nproc}-{t}"))
                      for t in range(ns.trials))  # fmt: skip
        same_table(work / f"out-{counts[0]}", work / f"out-{nproc}")
        results.append({"processes": nproc, "seconds": round(seconds, 2)})
    n_pairs = sum(1 for _ in data.open())
    base = results[0]["seconds"] * results[0]["processes"]
    print(f"{n_pairs} pairs, {threads} torch thread(s) per process, {os.cpu_count()} cores\n")
    print("| processes | wall s | pairs/s | speed-up | efficiency |\n| --- | --- | --- | --- | --- |")
    for r in results:
        r["speedup"] = round(results[0]["seconds"] / r["seconds"], 2)
        r["efficiency"] = round(base / (r["seconds"] * r["processes"]), 2)
        print(f"| {r['processes']} | {r['seconds']} | {n_pairs / r['seconds']:.1f} | {r['speedup']}x | "
              f"{r['efficiency']:.0%} |")  # fmt: skip
    if ns.json:
        ns.json.write_text(json.dumps({"pairs": n_pairs, "threads": threads, "cores": os.cpu_count(),
                                       "results": results}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
