"""Issue 15's benchmark matrix: every shape of job, side by side with TRL, plus the one-pair run.

For each shape (``short``: ~160-token prompts and ~10-token responses; ``cpu``: ~400 and ~100; ``long``: ~40 and
~400; ``chat``: conversations under a ChatML template) and each pair count (160 and 2,000), on one model size for
all cells, it runs ``bench_compare.side_by_side``: whole processes of prefdiag with a cold cache, prefdiag again
(warm cache) and TRL's ``DPOTrainer.evaluate()`` (``bf16=False``), one after the other in the same run, with
prefdiag's phase breakdown from ``benchmarks/prefdiag_timed.py``. Then the one-pair run: ``prefdiag compare`` on a
single pair (terminal report only, and with ``-o``) against ``python -c "import torch, transformers"``, alternated,
each process timed from outside, median of ``--one-pair-repeat``.

    python benchmarks/bench_matrix.py --prefdiag-rev HEAD            # the full matrix (~25 min on 2 quiet cores)
    python benchmarks/bench_matrix.py --quick                        # smoke test: every cell at 8 pairs, 1 layer

Writes ``--json`` (every cell's full side-by-side record, the one-pair samples, the machine) and ``--markdown`` (the
tables for benchmarks/README.md); both are rewritten after every cell, so a killed run keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_compare  # noqa: E402
import fixed_costs  # noqa: E402
import make_models  # noqa: E402

MATRIX_SHAPES = ("short", "cpu", "long", "chat")
TARGETS = {"cold_over_trl": 0.5, "warm_over_trl": 0.3, "score_pairs_per_s_over_trl": 1.5,
           "score_tokens_per_s_over_trl": 1.0, "one_pair_over_import_s": 1.5}  # fmt: skip
SCORE_PHASES = ("score", "scoring")  # prefdiag_timed's name for LogProbScorer.score (tolerant of a rename)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(MATRIX_SHAPES), help="comma-separated make_models shapes")
    parser.add_argument("--sizes", default="160,2000", help="comma-separated pair counts")
    parser.add_argument("--model", default="half", choices=sorted(make_models.MODELS),
                        help="the model every cell runs on (half: 4-layer Llama, hidden 128; cpu: hidden 256)")
    parser.add_argument("--repeat", type=int, default=1, help="side-by-side repetitions per cell (median reported)")
    parser.add_argument("--one-pair-repeat", type=int, default=3, help="alternated runs of the one-pair comparison")
    parser.add_argument("--skip-one-pair", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 8 pairs per cell, 1-layer models, one one-pair run, no 2,000-pair cells")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "prefdiag-bench"))
    parser.add_argument("--json", type=Path, help="results (default <work>/matrix-<model>.json)")
    parser.add_argument("--markdown", type=Path, help="tables (default: the JSON's path with .md)")
    parser.add_argument("--prefdiag-src", type=Path, default=bench_compare.REPO)
    parser.add_argument("--prefdiag-rev", help="benchmark prefdiag as committed at this revision (a git snapshot)")
    parser.add_argument("--prefdiag-args", default="", help="extra prefdiag compare options for every cell")
    parser.add_argument("--batch-size", type=int, default=8, help="TRL's per_device_eval_batch_size")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed for each child process")
    parser.add_argument("--deadline", type=float, default=3600, help="seconds for the whole matrix; cells that "
                        "do not fit are left out (and listed)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.layers, args.one_pair_repeat = "8", 1, 1
    else:
        args.layers = None
    return args


def compare_args(args: argparse.Namespace, pairs: int) -> argparse.Namespace:
    """The namespace ``bench_compare.side_by_side`` reads, for one cell on the CPU in float32."""
    import shlex

    return argparse.Namespace(
        work=args.work, seed=args.seed, pairs=pairs, layers=args.layers, model=args.model, device="cpu",
        dtype="float32", build_device="cpu", batch_size=args.batch_size, repeat=args.repeat, skip_trl=False,
        skip_second=False, prefdiag_args=shlex.split(args.prefdiag_args), timeout=args.timeout,
        deadline=args.deadline, started=args.started, peak_flops=None, checkpoint=lambda partial=None: None,
    )  # fmt: skip


# -- the one-pair run -----------------------------------------------------------------------------------------------


def one_pair(args: argparse.Namespace) -> dict[str, Any]:
    """Whole-process seconds of ``prefdiag compare`` on one pair (cold cache) against importing torch and
    transformers, alternated so that both see the same machine."""
    shape = make_models.get_shape("short", model=args.model, layers=args.layers)
    paths = bench_compare.ensure_inputs(compare_args(args, 1), shape, 1)
    work = Path(paths["dir"]) / "one-pair"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    base = [sys.executable, "-m", "prefdiag", "compare", paths["data"], "-r", paths["reference"], "-p",
            paths["policy"], "--device", "cpu", "--dtype", "float32"]  # fmt: skip
    commands = {
        "import_torch_transformers": [sys.executable, "-c", "import torch, transformers"],
        # what any transformers-based scorer pays before its first forward: the lazy imports, one tokenizer, two models
        "transformers_load_floor": [sys.executable, "-c", fixed_costs.FLOOR, paths["reference"], paths["policy"]],
        "prefdiag_terminal": base,
        "prefdiag_outputs": base + ["-q", "-o", str(work / "out")],
    }
    samples: dict[str, list[dict[str, Any]]] = {k: [] for k in commands}
    for rep in range(args.one_pair_repeat):
        for name, cmd in commands.items():
            cache = bench_compare.fresh_cache_dir(work / "caches")
            shutil.rmtree(work / "out", ignore_errors=True)
            env = bench_compare.child_env({"PREFDIAG_CACHE_DIR": str(cache)})
            # cwd outside the repository, so that `-m prefdiag` imports the tree under test (PYTHONPATH)
            timeout = bench_compare.child_timeout(compare_args(args, 1))
            done = bench_compare.run_process(f"one_pair-{name}-{rep + 1}", cmd, work / "logs", timeout, env, cwd=work)
            samples[name].append({k: done[k] for k in ("seconds", "cpu_seconds", "rc", "load_average")})
            shutil.rmtree(cache, ignore_errors=True)
    medians = {name: statistics.median(s["seconds"] for s in runs) for name, runs in samples.items()}
    cpu = {name: statistics.median(s["cpu_seconds"] for s in runs) for name, runs in samples.items()}
    baseline = medians["import_torch_transformers"]
    return {
        "data": paths["data"],
        "samples": samples,
        "median_seconds": medians,
        "median_cpu_seconds": cpu,
        "over_import_seconds": {k: medians[k] - baseline for k in commands if k != "import_torch_transformers"},
        "failed": [name for name, runs in samples.items() if any(s["rc"] != 0 for s in runs)],
    }


# -- summarising a cell ---------------------------------------------------------------------------------------------


def phase_seconds(stats: dict[str, Any] | None) -> dict[str, float]:
    """A prefdiag_timed stats record as {phase: seconds}, imports and the rest included."""
    if not stats:
        return {}
    out = {"imports": stats.get("imports_seconds")}
    out.update({k: v.get("seconds") if isinstance(v, dict) else v for k, v in (stats.get("phases") or {}).items()})
    out["other"] = stats.get("other_seconds")
    return {k: v for k, v in out.items() if isinstance(v, (int, float))}


def cell_summary(record: dict[str, Any]) -> dict[str, Any]:
    """The figures of one side-by-side record that the matrix table shows."""
    runs, work, ratios = record.get("runs", {}), record.get("work", {}), record.get("ratios", {})
    cold, warm, trl = (runs.get(k) or {} for k in ("prefdiag_first", "prefdiag_second", "trl"))
    ok = all(r.get("rc") == 0 for r in (cold, warm, trl))
    out: dict[str, Any] = {
        "ok": ok and "error" not in record,
        "mean_prompt_tokens": work.get("mean_prompt_tokens"),
        "mean_response_tokens": work.get("mean_response_tokens"),
        "cold_seconds": cold.get("process_seconds"),
        "warm_seconds": warm.get("process_seconds"),
        "trl_seconds": trl.get("process_seconds"),
        "cold_over_trl": ratios.get("prefdiag_over_trl"),
        "cold_over_trl_cpu_time": ratios.get("prefdiag_over_trl_cpu_time"),
        "load_average": [r.get("load_average") for r in (cold, warm, trl)],
        "agreement_max_abs_nats": (record.get("agreement_max_abs_nats") or {}).get("max"),
        "phases_cold": phase_seconds(cold.get("stats")),
        "phases_warm": phase_seconds(warm.get("stats")),
    }
    if out["warm_seconds"] and out["trl_seconds"]:
        out["warm_over_trl"] = out["warm_seconds"] / out["trl_seconds"]
    score = next((out["phases_cold"][k] for k in SCORE_PHASES if k in out["phases_cold"]), None)
    evaluate = (trl.get("result") or {}).get("evaluate_seconds")
    pairs = record.get("pairs")
    if score and evaluate and pairs:
        out["score_seconds"], out["evaluate_seconds"] = score, evaluate
        out["score_pairs_per_s_over_trl"] = evaluate / score  # the same pairs on both sides
        if work.get("tokens") and work.get("tokens_as_trl_computes_them"):  # tokens each one computes, no padding
            out["score_tokens_per_s_over_trl"] = (work["tokens"] / score) / (
                work["tokens_as_trl_computes_them"] / evaluate)
    return out


# -- Markdown -------------------------------------------------------------------------------------------------------


def fmt(value: Any, spec: str = ".2f") -> str:
    return bench_compare.cell(value, spec)


def against(value: float | None, target: float, *, at_least: bool = False) -> str:
    """A ratio with its verdict against the target."""
    if value is None:
        return "-"
    met = value >= target if at_least else value <= target
    return f"{value:.2f} {'met' if met else '**not met**'}"


def markdown(result: dict[str, Any]) -> str:
    """The tables for benchmarks/README.md."""
    hw, cells = result["hardware"], result["cells"]
    trl_version = next((c["record"]["runs"]["trl"].get("result", {}).get("trl_version") for c in cells
                        if (c.get("record", {}).get("runs", {}).get("trl") or {}).get("result")), "-")  # fmt: skip
    lines = [
        f"Machine: {hw.get('lscpu_model_name') or hw.get('cpu_model')} ({hw.get('cpu_count')} CPUs), "
        f"torch {hw.get('torch')} ({hw.get('torch_threads')} threads), transformers {hw.get('transformers')}, "
        f"TRL {trl_version}, Python {hw.get('python')}; prefdiag {hw.get('prefdiag_git')}. "
        f"Model: {result['model_description']}, fp32, on every cell. Load average "
        f"{fmt(result['load_average_start'][0])} at the start, {fmt(result['load_average_end'][0])} at the end; "
        f"{result['harness_seconds'] / 60:.1f} minutes in all.",
    ]
    if cells:
        lines += _matrix_tables(cells)
    lines += _one_pair_table(result.get("one_pair"))
    if result.get("left_out"):
        lines += ["", "Left out (the deadline): " + ", ".join(result["left_out"])]
    return "\n".join(lines) + "\n"


def _matrix_tables(cells: list[dict[str, Any]]) -> list[str]:
    """The matrix table and the phase breakdown."""
    lines = [
        "",
        "| shape | pairs | prompt tok | response tok | prefdiag cold s | prefdiag warm s | TRL s | cold / TRL (<= 0.5) "
        "| warm / TRL (<= 0.3) | cold / TRL, CPU time | score pairs/s / TRL's (>= 1.5) | per token / TRL's (>= 1) "
        "| max \\|prefdiag - TRL\\| |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in cells:
        s = c.get("summary") or {}
        if not s:
            lines.append(f"| `{c['shape']}` | {c['pairs']} | {c.get('error', 'not run')} |" + " |" * 10)
            continue
        lines.append(
            f"| `{c['shape']}` | {c['pairs']:,} | {fmt(s['mean_prompt_tokens'], '.0f')} "
            f"| {fmt(s['mean_response_tokens'], '.0f')} | {fmt(s['cold_seconds'])} | {fmt(s['warm_seconds'])} "
            f"| {fmt(s['trl_seconds'])} | {against(s.get('cold_over_trl'), TARGETS['cold_over_trl'])} "
            f"| {against(s.get('warm_over_trl'), TARGETS['warm_over_trl'])} "
            f"| {fmt(s.get('cold_over_trl_cpu_time'))} "
            f"| {against(s.get('score_pairs_per_s_over_trl'), TARGETS['score_pairs_per_s_over_trl'], at_least=True)} "
            f"| {against(s.get('score_tokens_per_s_over_trl'), TARGETS['score_tokens_per_s_over_trl'], at_least=True)} "
            f"| {fmt(s.get('agreement_max_abs_nats'), '.1e')} |"
            + ("" if s["ok"] else " (a run failed: see the JSON)")
        )
    lines += ["", "Tokens are means per pair, BOS, EOS and chat markup included. *score pairs/s / TRL's*: the same "
              "pairs over prefdiag's `LogProbScorer.score` time and over TRL's `evaluate()`. *per token*: tokens "
              "each computes (prefdiag: each prompt once; TRL: each prompt twice; padding not counted) per second. "
              "The last column is the largest difference over the four per-pair log-prob columns, in nats.",
              "", "prefdiag's phases, seconds (cold cache run; warm run in brackets):", ""]
    phases: list[str] = []
    for c in cells:
        for k in (c.get("summary") or {}).get("phases_cold", {}):
            if k not in phases:
                phases.append(k)
    if phases:
        lines.append("| shape | pairs | " + " | ".join(phases) + " |")
        lines.append("| --- | --- |" + " --- |" * len(phases))
        for c in cells:
            s = c.get("summary") or {}
            if s:
                cold, warm = s.get("phases_cold", {}), s.get("phases_warm", {})
                row = [f"{fmt(cold.get(k))} ({fmt(warm.get(k))})" for k in phases]
                lines.append(f"| `{c['shape']}` | {c['pairs']:,} | " + " | ".join(row) + " |")
    return lines


def _one_pair_table(one: dict[str, Any] | None) -> list[str]:
    """The one-pair run's table (none when it did not run)."""
    lines: list[str] = []
    if one:
        m, cpu, over = one["median_seconds"], one["median_cpu_seconds"], one["over_import_seconds"]
        n = len(one["samples"]["import_torch_transformers"])
        lines += ["", f"One-pair run (median of {n}, alternated, cold cache; target: at most "
                  f"{TARGETS['one_pair_over_import_s']} s above the import):", "",
                  "| process | seconds | CPU s | above the import |", "| --- | --- | --- | --- |",
                  f"| `python -c \"import torch, transformers\"` | {fmt(m['import_torch_transformers'])} "
                  f"| {fmt(cpu['import_torch_transformers'])} | |"]  # fmt: skip
        for key, label in (("transformers_load_floor", "floor: `AutoTokenizer` + 2 x `AutoModelForCausalLM` "
                            "`.from_pretrained`, nothing else"),
                           ("prefdiag_terminal", "`prefdiag compare` one pair, terminal report"),
                           ("prefdiag_outputs", "`prefdiag compare` one pair, `-q -o DIR`")):  # fmt: skip
            if key not in over:
                continue
            verdict = against(over[key], TARGETS["one_pair_over_import_s"]).replace(f"{over[key]:.2f} ", "")
            verdict = "(reference)" if key == "transformers_load_floor" else verdict
            lines.append(f"| {label} | {fmt(m[key])} | {fmt(cpu[key])} | {over[key]:+.2f} s {verdict} |")
    return lines


# -- entry point ----------------------------------------------------------------------------------------------------


def lscpu_model_name() -> str | None:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), None)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.started = time.perf_counter()
    work = Path(args.work)
    if args.prefdiag_rev:
        bench_compare.PREFDIAG_SRC = bench_compare.snapshot(args.prefdiag_rev, work)
    else:
        bench_compare.PREFDIAG_SRC = args.prefdiag_src.resolve()
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    sizes = [int(n) for n in args.sizes.split(",")]
    model = make_models.get_shape("cpu", model=args.model, layers=args.layers)
    path = args.json or work / f"matrix-{args.model}{'-quick' if args.quick else ''}.json"
    md_path = args.markdown or path.with_suffix(".md")
    path.parent.mkdir(parents=True, exist_ok=True)
    hardware = bench_compare.hardware("cpu") | {"lscpu_model_name": lscpu_model_name()}
    result: dict[str, Any] = {
        "mode": "matrix",
        "hardware": hardware,
        "args": {k: str(v) for k, v in vars(args).items()},
        "model": args.model,
        "model_description": f"Llama, {model.layers} layer{'s' * (model.layers != 1)}, hidden {model.hidden}, "
                             f"{model.heads} heads, intermediate {model.intermediate}, vocab {model.vocab}",
        "load_average_start": os.getloadavg(),
        "cells": [],
        "left_out": [],
    }

    def save() -> None:
        result["harness_seconds"] = round(time.perf_counter() - args.started, 2)
        result["load_average_end"] = os.getloadavg()
        path.write_text(json.dumps(result, indent=2, default=bench_compare._json_default))
        md_path.write_text(markdown(result))

    if not args.skip_one_pair:
        try:
            result["one_pair"] = one_pair(args)
        except SystemExit as exc:
            result["left_out"].append(f"one-pair run ({exc})")
        save()
    for pairs in sizes:
        for name in shapes:
            shape = make_models.get_shape(name, model=args.model, layers=args.layers)
            cell: dict[str, Any] = {"shape": name, "pairs": pairs}
            bench_compare.log(f"matrix cell {name} x {pairs} pairs")
            try:
                record = bench_compare.side_by_side(compare_args(args, pairs), shape)
            except SystemExit as exc:  # the deadline, or a build that failed
                cell["error"] = str(exc)
                result["left_out"].append(f"{name} x {pairs}")
                result["cells"].append(cell)
                save()
                continue
            cell["record"], cell["summary"] = record, cell_summary(record)
            result["cells"].append(cell)
            save()
    save()
    print(md_path.read_text())
    print(f"results: {path}\ntables: {md_path}")
    failed = [f"{c['shape']} x {c['pairs']}" for c in result["cells"] if not (c.get("summary") or {}).get("ok")]
    failed += [f"one-pair {k}" for k in (result.get("one_pair") or {}).get("failed", [])]
    if failed:
        print("failed or left out: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
