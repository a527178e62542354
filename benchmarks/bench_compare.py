"""Benchmark harness for issue 4: prefdiag against TRL's ``DPOTrainer.evaluate()`` on the same pairs and models.

Modes (any combination; side-by-side when none is named):

``--side-by-side``
    Builds (or reuses) the shape's models and data, then times three whole processes with ``time.perf_counter``
    around ``subprocess.run``: (a) ``prefdiag compare`` with a fresh, empty log-prob cache, (b) the same command again
    (the cache is warm now), (c) ``benchmarks/trl_evaluate.py``. prefdiag runs through ``benchmarks/prefdiag_timed.py``,
    which is ``python -m prefdiag`` plus phase timers and peak-memory readings. Reports process seconds, prefdiag/TRL
    and second/first ratios against the issue's targets, pairs/s, tokens/s (each prompt counted once, plus both
    responses), useful FLOP/s and MFU on a GPU, peak memory, and the largest per-pair log-prob difference between
    prefdiag and TRL.
``--precision``
    Scores the first ``--precision-pairs`` pairs in-process with ``prefdiag.api.compare`` in float32 (the truth) and
    in bfloat16, and with two plain-forward emulations of bf16 scoring: ``trl_fused_bf16`` (what TRL 1.16's fused LM
    head does: logits rounded to bf16, log-sum-exp and sum in fp32) and ``naive_bf16`` (logits, log_softmax and the
    sum all in bf16, as older TRL and most hand-written loops do). Reports each one's error against the truth in nats.
``--scaling``
    prefdiag on a model-light shape (``tiny`` by default) at growing pair counts (``--scaling-sizes``), first and
    second (cached) run, with per-phase time per pair: a phase whose time per pair grows with the count is super-linear.

Examples::

    python benchmarks/bench_compare.py --shape cpu
    python benchmarks/bench_compare.py --shape cpu --precision
    python benchmarks/bench_compare.py --scaling --scaling-sizes 1000,10000
    python benchmarks/bench_compare.py --shape qwen0.5b --device cuda --dtype bfloat16 --json out.json

Everything is written under ``--work`` (default ``$TMPDIR/prefdiag-bench``): models, data, each run's output and
logs; results go to ``--json`` (default ``<work>/<shape>/results-<mode>.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import make_models  # noqa: E402

PREFDIAG_SRC = REPO  # the directory holding the prefdiag package under test (--prefdiag-src)

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, SXM
TARGETS = {
    "prefdiag_over_trl": {"cpu": 0.5, "cuda": 0.25},  # issue 4: 2x on a CPU, 4x on an H100
    "second_over_first": 0.55,
}


# -- small helpers --------------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of every child: offline, the repo importable (also without an editable install)."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(PREFDIAG_SRC), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra or {})
    return env


def run_process(label: str, cmd: list[str], logs: Path, timeout: float, env: dict[str, str] | None = None,
                cwd: Path = REPO) -> dict:  # fmt: skip
    """Run one command as its own process; wall time measured around subprocess.run. stdout/stderr to logs/."""
    logs.mkdir(parents=True, exist_ok=True)
    log(f"{label}: {' '.join(cmd)}")
    load_before = os.getloadavg()[0]
    usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or child_env(), cwd=cwd)
        seconds, rc, stdout, stderr = time.perf_counter() - started, done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as exc:
        seconds, rc = time.perf_counter() - started, "timeout"
        stdout = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        stderr = (exc.stderr or b"").decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # children run one at a time: the difference is this one's
    cpu_seconds = (usage.ru_utime - usage_before.ru_utime) + (usage.ru_stime - usage_before.ru_stime)
    load_average = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    (logs / f"{label}.stdout").write_text(stdout)
    (logs / f"{label}.stderr").write_text(stderr)
    log(f"{label}: rc={rc} in {seconds:.1f}s, {cpu_seconds:.1f} CPU s "
        f"(1-min load average {load_average[0]} -> {load_average[1]})")
    if rc != 0:
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        log(f"{label} failed; stderr tail:\n{tail}")
    return {"seconds": round(seconds, 3), "cpu_seconds": round(cpu_seconds, 3), "rc": rc, "stdout": stdout,
            "load_average": load_average}  # fmt: skip


def last_json_line(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def gpu_name() -> str | None:
    """The GPU's name from nvidia-smi (so the harness itself never initialises CUDA)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0] if out else None


def hardware(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "device": device,
    }
    try:
        import torch
        import transformers

        info["torch"] = torch.__version__
        info["transformers"] = transformers.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    if device == "cuda":
        info["gpu"] = gpu_name()
    info["prefdiag_src"] = str(PREFDIAG_SRC)
    info["prefdiag_git"] = _git_state(PREFDIAG_SRC)
    return info


def snapshot(rev: str, work: Path) -> Path:
    """Extract prefdiag/ as committed at ``rev`` (git archive), so concurrent edits do not leak into a benchmark."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", rev], capture_output=True, text=True,
                            check=True).stdout.strip()  # fmt: skip
    dest = work / f"prefdiag-src-{commit}"
    if not (dest / "prefdiag" / "__init__.py").exists():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "prefdiag"], capture_output=True,
                                 check=True).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        (dest / "COMMIT").write_text(commit + "\n")
    log(f"benchmarking prefdiag at {commit} from {dest}")
    return dest


def _git_state(path: Path) -> str | None:
    """``<commit>`` or ``<commit>+dirty`` (uncommitted changes under prefdiag/); a --prefdiag-rev snapshot's commit;
    None otherwise."""
    if (path / "COMMIT").exists():
        return (path / "COMMIT").read_text().strip() + " (snapshot)"
    try:
        commit = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10)  # fmt: skip
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--", "prefdiag"],
                               capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() + ("+dirty" if dirty else "")


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    return "cuda" if gpu_name() else "cpu"


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if device == "cuda" else "float32"


def ensure_inputs(args, shape: make_models.Shape, pairs: int | None = None) -> dict[str, Any]:
    """Build (or reuse) models and data in a child process, so the harness holds no model or GPU memory."""
    model = getattr(args, "model", None)
    out = Path(args.work) / (f"{shape.name}-{model}" if model else shape.name)
    cmd = [sys.executable, str(HERE / "make_models.py"), "--shape", shape.name, "--out", str(out),
           "--device", args.build_device, "--seed", str(args.seed)]  # fmt: skip
    if pairs is not None:
        cmd += ["--pairs", str(pairs)]
    if model:
        cmd += ["--model", model]
    if args.layers is not None:
        cmd += ["--layers", str(args.layers)]
    done = run_process(f"make_models-{shape.name}", cmd, out / "logs", child_timeout(args))
    result = last_json_line(done["stdout"])
    if done["rc"] != 0 or result is None:
        raise SystemExit(f"building {shape.name} failed (see {out / 'logs'})")
    result["dir"] = str(out)
    return result


def child_timeout(args) -> float:
    """Seconds a child may run: --timeout, cut to what is left of --deadline (the harness's own budget)."""
    if args.deadline is None:
        return args.timeout
    left = args.deadline - (time.perf_counter() - args.started)
    if left < 5:
        raise SystemExit(f"--deadline of {args.deadline:.0f}s reached; stopping (partial results were saved)")
    return min(args.timeout, left)


def fresh_cache_dir(base: Path) -> Path:
    """An empty log-prob cache directory, so a 'first run' is really cold."""
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="cache-", dir=base))


# -- work and FLOP accounting ---------------------------------------------------------------------------------------


def token_counts(pairs_file: Path) -> dict[str, Any]:
    """Token counts from a prefdiag pairs table: prompt once + chosen + rejected (the useful work per pair)."""
    import pandas as pd

    table = pd.read_parquet(pairs_file, columns=["prompt_tokens", "chosen_tokens", "rejected_tokens"])
    p, c, r = (table[k].to_numpy(dtype="int64") for k in ("prompt_tokens", "chosen_tokens", "rejected_tokens"))
    return {"prompt": p, "chosen": c, "rejected": r, "tokens": int(p.sum() + c.sum() + r.sum()),
            "trl_tokens": int(2 * p.sum() + c.sum() + r.sum())}  # fmt: skip


def scoring_flops(shape: make_models.Shape, counts: dict[str, int], tokens: dict[str, Any]) -> dict[str, float]:
    """Useful forward FLOPs to score every pair under one model:

    - body: 2 * (non-embedding, non-head parameters) * (prompt once + chosen + rejected tokens)
    - lm_head: 2 * hidden * vocab per completion token (the head is only needed where a completion token is predicted)
    - attention: per layer 4 * heads * head_dim per (query, visible key) pair, causal; a prompt token sees the
      prompt before it, a response token the prompt and its own response before it (QK^T and AV, no masking waste)
    """
    p = tokens["prompt"].astype("float64")
    c = tokens["chosen"].astype("float64")
    r = tokens["rejected"].astype("float64")
    head_dim = shape.hidden // shape.heads
    visible = p * (p + 1) / 2 + c * p + c * (c + 1) / 2 + r * p + r * (r + 1) / 2
    body = 2.0 * counts["body"] * tokens["tokens"]
    head = 2.0 * shape.hidden * shape.vocab * float(c.sum() + r.sum())
    attention = shape.layers * 4.0 * shape.heads * head_dim * float(visible.sum())
    return {"body": body, "lm_head": head, "attention": attention, "per_model": body + head + attention}


def peak_flops(device: str, gpu: str | None, override: float | None) -> float | None:
    if override:
        return override
    if device != "cuda" or not gpu:
        return None
    for key, value in PEAK_BF16_FLOPS.items():
        if key in gpu:
            return value
    return None


# -- side by side ---------------------------------------------------------------------------------------------------


def prefdiag_command(paths: dict, out: Path, device: str, dtype: str, extra: Sequence[str] = ()) -> list[str]:
    return [sys.executable, str(HERE / "prefdiag_timed.py"), "compare", paths["data"], "-r", paths["reference"],
            "-p", paths["policy"], "--device", device, "--dtype", dtype, "-q", "-o", str(out), *extra]  # fmt: skip


def run_prefdiag(label: str, paths: dict, work: Path, device: str, dtype: str, cache: Path, timeout: float,
                 extra: Sequence[str] = ()) -> dict:
    """One prefdiag process; returns its wall time, instrumented phases and what its summary says about memory."""
    out = work / "runs" / label
    shutil.rmtree(out, ignore_errors=True)
    stats_file = work / "runs" / f"{label}.stats.json"
    stats_file.parent.mkdir(parents=True, exist_ok=True)
    env = child_env({"PREFDIAG_CACHE_DIR": str(cache), "PREFDIAG_BENCH_STATS": str(stats_file)})
    done = run_process(label, prefdiag_command(paths, out, device, dtype, extra), work / "logs", timeout, env)
    result: dict[str, Any] = {"process_seconds": done["seconds"], "cpu_seconds": done["cpu_seconds"], "rc": done["rc"],
                              "output": str(out), "load_average": done["load_average"]}  # fmt: skip
    if stats_file.exists():
        result["stats"] = json.loads(stats_file.read_text())
    summary = out / "summary.json"
    if summary.exists():
        provenance = json.loads(summary.read_text()).get("provenance", {})
        reported = {k: v for k, v in _walk(provenance) if "memory" in k.lower() or "peak" in k.lower()}
        if reported:
            result["memory_reported_by_prefdiag"] = reported
        result["scoring"] = {model: {k: provenance[model][k] for k in ("layout", "first_batch_seconds")
                                     if k in provenance.get(model, {})} for model in ("reference", "policy")}
    return result


def _walk(record: Any, prefix: str = ""):
    if isinstance(record, dict):
        for key, value in record.items():
            yield from _walk(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), record


def agreement(pairs_file: Path, trl_logps: dict[str, list[float]]) -> dict[str, float]:
    """Largest |prefdiag - TRL| per log-prob column, in nats (pairs in input order in both)."""
    import numpy as np
    import pandas as pd

    table = pd.read_parquet(pairs_file)
    out = {}
    for trl_key in ("ref_chosen", "ref_rejected", "policy_chosen", "policy_rejected"):
        column = f"{trl_key}_logp"
        ours = table[column].to_numpy(dtype="float64")
        theirs = np.asarray(trl_logps[trl_key], dtype="float64")
        out[column] = float(np.nanmax(np.abs(ours - theirs)))
    out["max"] = max(out.values())
    return out


def side_by_side(args, shape: make_models.Shape) -> dict[str, Any]:
    paths = ensure_inputs(args, shape, args.pairs)
    work = Path(paths["dir"])
    samples: dict[str, list[dict[str, Any]]] = {}
    for rep in range(args.repeat):
        suffix = f"-{rep + 1}" if args.repeat > 1 else ""
        cache = fresh_cache_dir(work / "caches")
        labels = ["prefdiag_first"] + ([] if args.skip_second else ["prefdiag_second"])
        for label in labels:
            run = run_prefdiag(label + suffix, paths, work, args.device, args.dtype, cache, child_timeout(args),
                               args.prefdiag_args)
            samples.setdefault(label, []).append(run)
            args.checkpoint({"side_by_side_partial": samples})
        shutil.rmtree(cache, ignore_errors=True)
        if not args.skip_trl:
            cmd = [sys.executable, str(HERE / "trl_evaluate.py"), "--data", paths["data"], "--reference",
                   paths["reference"], "--policy", paths["policy"], "--device", args.device, "--dtype", args.dtype,
                   "--batch-size", str(args.batch_size)] + (["--logps"] if rep == 0 else [])  # fmt: skip
            done = run_process("trl_evaluate" + suffix, cmd, work / "logs", child_timeout(args))
            run = {"process_seconds": done["seconds"], "cpu_seconds": done["cpu_seconds"], "rc": done["rc"],
                   "result": last_json_line(done["stdout"]), "load_average": done["load_average"]}  # fmt: skip
            samples.setdefault("trl", []).append(run)
            args.checkpoint({"side_by_side_partial": samples})
    # each tool's figures are its median run (by process time); every sample's time is kept
    runs: dict[str, Any] = {}
    for name, runs_of_tool in samples.items():
        ok = [r for r in runs_of_tool if r["rc"] == 0] or runs_of_tool
        median = statistics.median_low(r["process_seconds"] for r in ok)
        runs[name] = next(r for r in ok if r["process_seconds"] == median)
        runs[name]["samples_process_seconds"] = [r["process_seconds"] for r in runs_of_tool]
        runs[name]["samples_cpu_seconds"] = [r["cpu_seconds"] for r in runs_of_tool]
        runs[name]["median_cpu_seconds"] = statistics.median_low(r["cpu_seconds"] for r in ok)
        runs[name]["best_process_seconds"] = min(r["process_seconds"] for r in ok)
    logps = next((r["result"].get("logps") for r in samples.get("trl", []) if r.get("result")), None)

    n = paths["pairs"]
    result: dict[str, Any] = {"mode": "side_by_side", "shape": shape.name, "pairs": n, "inputs": paths, "runs": runs}
    first = runs["prefdiag_first"]
    pairs_file = Path(first["output"]) / "pairs.parquet"
    if first["rc"] != 0 or not pairs_file.exists():
        result["error"] = "prefdiag's first run failed; see logs"
        return result
    tokens = token_counts(pairs_file)
    counts = make_models.count_parameters(shape)
    flops = scoring_flops(shape, counts, tokens)
    total_flops = 2 * flops["per_model"]  # reference and policy
    gpu = gpu_name() if args.device == "cuda" else None
    peak = peak_flops(args.device, gpu, args.peak_flops)
    result["work"] = {
        "tokens": tokens["tokens"],
        "tokens_as_trl_computes_them": tokens["trl_tokens"],
        "mean_prompt_tokens": float(tokens["prompt"].mean()),
        "mean_response_tokens": float((tokens["chosen"].mean() + tokens["rejected"].mean()) / 2),
        "parameters": counts,
        "useful_flops": {k: v * 2 for k, v in flops.items() if k != "per_model"} | {"total": total_flops},
        "peak_flops": peak,
        "gpu": gpu,
    }

    def rates(seconds: float | None, computed: bool = True) -> dict[str, Any]:
        if not seconds:
            return {}
        out = {"pairs_per_s": n / seconds, "tokens_per_s": tokens["tokens"] / seconds}
        if computed:  # a run served from the cache did no model work
            out["tflops_per_s"] = total_flops / seconds / 1e12
            if peak:
                out["mfu"] = total_flops / seconds / peak
        return out

    for name, run in runs.items():
        inner = None
        if name.startswith("prefdiag") and run.get("stats"):
            inner = run["stats"]["phases"].get("score", {}).get("seconds")
        elif name == "trl" and run.get("result"):
            inner = run["result"]["evaluate_seconds"]
        run["compute_seconds"] = inner  # prefdiag: LogProbScorer.score; TRL: evaluate()
        run["rates_process"] = rates(run["process_seconds"] if run["rc"] == 0 else None, computed=inner is not None)
        run["rates_compute"] = rates(inner)

    ratios: dict[str, Any] = {}
    trl = runs.get("trl")
    if trl and trl["rc"] == 0:
        ratios["prefdiag_over_trl"] = first["process_seconds"] / trl["process_seconds"]
        ratios["prefdiag_over_trl_target"] = TARGETS["prefdiag_over_trl"].get(args.device)
        ratios["speedup_vs_trl"] = trl["process_seconds"] / first["process_seconds"]
        ratios["prefdiag_over_trl_best_of_runs"] = first["best_process_seconds"] / trl["best_process_seconds"]
        ratios["prefdiag_over_trl_cpu_time"] = first["median_cpu_seconds"] / trl["median_cpu_seconds"]
        if first["compute_seconds"] and trl["compute_seconds"]:
            ratios["scoring_over_evaluate"] = first["compute_seconds"] / trl["compute_seconds"]
        if logps is not None:
            result["agreement_max_abs_nats"] = agreement(pairs_file, logps)
        for run in samples["trl"]:
            if run.get("result"):
                run["result"].pop("logps", None)
    second = runs.get("prefdiag_second")
    if second and second["rc"] == 0:
        ratios["second_over_first"] = second["process_seconds"] / first["process_seconds"]
        ratios["second_over_first_best_of_runs"] = second["best_process_seconds"] / first["best_process_seconds"]
        ratios["second_over_first_cpu_time"] = second["median_cpu_seconds"] / first["median_cpu_seconds"]
        ratios["second_over_first_target"] = TARGETS["second_over_first"]
    result["ratios"] = ratios
    result["memory"] = {
        name: {k: v for k, v in (run.get("stats") or run.get("result") or {}).items()
               if k.startswith(("cuda_max", "peak_rss"))} | run.get("memory_reported_by_prefdiag", {})
        for name, run in runs.items()
    }  # fmt: skip
    return result


def render_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), "-" * len(line(headers)), *(line(r) for r in rows)])


def cell(value: Any, spec: str) -> str:
    """A formatted number, or '-' when there is none."""
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return format(value, spec)


def print_side_by_side(result: dict[str, Any]) -> None:
    runs, work = result["runs"], result.get("work", {})
    tflop = work.get("useful_flops", {}).get("total", 0) / 1e12
    print(f"\nshape {result['shape']}: {result['pairs']} pairs, {work.get('tokens', '?')} tokens (prompt once + both "
          f"responses); useful work {tflop:.2f} TFLOP for both models")  # fmt: skip
    rows = []
    for name, run in runs.items():
        rp, rc = run.get("rates_process", {}), run.get("rates_compute", {})
        mem = result.get("memory", {}).get(name, {})
        if mem.get("cuda_max_allocated_gib") is not None:
            peak = f"{mem['cuda_max_allocated_gib']:.2f} GiB GPU"
        else:
            peak = cell(mem.get("peak_rss_mib"), ".0f") + " MiB RSS"
        rows.append([
            name + ("" if run["rc"] == 0 else f" (FAILED rc={run['rc']})"),
            cell(run["process_seconds"], ".2f"), cell(run.get("median_cpu_seconds"), ".1f"),
            cell(run.get("compute_seconds"), ".2f"), cell(rp.get("pairs_per_s"), ".2f"),
            cell(rp.get("tokens_per_s"), ".0f"), cell(rc.get("tflops_per_s"), ".3f"),
            cell(rc.get("mfu"), ".1%"), peak,
        ])  # fmt: skip
    headers = ["run", "process s", "CPU s", "compute s", "pairs/s", "tokens/s", "TFLOP/s*", "MFU*", "peak memory"]
    print(render_table(headers, rows))
    print("* over the compute part: prefdiag's LogProbScorer.score, TRL's evaluate(); pairs/s and tokens/s over the "
          "whole process")
    for name, run in runs.items():
        if len(run.get("samples_process_seconds", [])) > 1:
            print(f"{name}: {len(run['samples_process_seconds'])} runs (medians shown): process s "
                  + ", ".join(f"{x:.2f}" for x in run["samples_process_seconds"])
                  + "; CPU s " + ", ".join(f"{x:.1f}" for x in run["samples_cpu_seconds"]))  # fmt: skip
    for key, value in result.get("ratios", {}).items():
        if value is not None and not key.endswith("_target"):
            base = key.removesuffix("_best_of_runs").removesuffix("_cpu_time")
            target = result["ratios"].get(f"{base}_target")
            verdict = "" if target is None else f"  (target <= {target}: {'met' if value <= target else 'NOT met'})"
            print(f"{key:<32}{value:.3f}{verdict}")
    if "agreement_max_abs_nats" in result:
        print(f"{'max |prefdiag - TRL|':<32}{result['agreement_max_abs_nats']['max']:.2e} nats")
    first = runs.get("prefdiag_first", {}).get("stats")
    if first:
        phases = sorted(first["phases"].items(), key=lambda kv: -kv[1]["seconds"])
        parts = [f"imports {first['imports_seconds']:.1f}"]
        parts += [f"{k} {v['seconds']:.1f}" for k, v in phases if v["seconds"] >= 0.05]
        print(f"prefdiag first run, seconds by phase: {', '.join(parts)}, other {first['other_seconds']:.1f}")
    scoring = runs.get("prefdiag_first", {}).get("scoring", {})
    if any(scoring.values()):  # the first batch includes compiling the kernel (packed layout on CUDA)
        print("prefdiag first run, layout and first batch: " + "; ".join(
            f"{model} {v['layout']}, {v['first_batch_seconds']:.2f} s" for model, v in scoring.items() if v))


# -- precision ------------------------------------------------------------------------------------------------------


def precision(args, shape: make_models.Shape) -> dict[str, Any]:
    """Errors of bf16 scoring against fp32 truth, in nats, on the first --precision-pairs pairs."""
    import numpy as np

    from transformers.utils import logging as hf_logging

    sys.path.insert(0, str(PREFDIAG_SRC))
    from prefdiag import api

    hf_logging.disable_progress_bar()

    paths = ensure_inputs(args, shape, args.pairs)
    work = Path(paths["dir"])
    subset = work / f"pairs-precision-{args.precision_pairs}.jsonl"
    with open(paths["data"]) as src:
        lines = [line for _, line in zip(range(args.precision_pairs), src)]
    subset.write_text("".join(lines))
    device = args.device
    columns = ("ref_chosen_logp", "ref_rejected_logp", "policy_chosen_logp", "policy_rejected_logp")

    def prefdiag_scores(dtype: str) -> tuple[dict[str, np.ndarray], float]:
        options = api.RunOptions(dtype=dtype, device=device)
        if hasattr(options, "cache"):
            options.cache = False
        started = time.perf_counter()
        table = api.compare(str(subset), paths["reference"], paths["policy"], options).pairs
        scores = {c: table[c].to_numpy(dtype="float64") for c in columns}
        scores["chosen_tokens"] = table["chosen_tokens"].to_numpy()
        scores["rejected_tokens"] = table["rejected_tokens"].to_numpy()
        return scores, time.perf_counter() - started

    log(f"precision: prefdiag float32 (truth) on {len(lines)} pairs")
    truth, truth_seconds = prefdiag_scores("float32")
    log("precision: prefdiag bfloat16")
    pd_bf16, bf16_seconds = prefdiag_scores("bfloat16")
    report: dict[str, Any] = {}
    args.checkpoint({"precision_partial": {"prefdiag_bf16": _errors(pd_bf16, truth, columns)}})
    log("precision: plain-forward emulations (fp32, TRL fused bf16, naive bf16)")
    emulated = emulate(paths, subset, device)
    for name, scores in {"prefdiag_bf16": pd_bf16, **emulated}.items():
        report[name] = _errors(scores, truth, columns)
    mean_logp = float(np.mean([truth[c].mean() for c in columns]))
    mean_tokens = float(np.mean(np.concatenate([truth["chosen_tokens"], truth["rejected_tokens"]])))
    return {
        "mode": "precision",
        "shape": shape.name,
        "pairs": len(lines),
        "device": device,
        "truth": "prefdiag float32",
        "truth_mean_logp": mean_logp,
        "mean_completion_tokens": mean_tokens,
        "seconds": {"prefdiag_float32": truth_seconds, "prefdiag_bfloat16": bf16_seconds},
        "errors": report,
    }


def _errors(scores: dict, truth: dict, columns) -> dict[str, Any]:
    """Absolute errors of one method's per-pair log-probs against the truth, in nats."""
    import numpy as np

    n_tokens = {c: truth["chosen_tokens"] if "chosen" in c else truth["rejected_tokens"] for c in columns}

    def margin(s):  # the DPO log-ratio margin (before beta)
        return (s["policy_chosen_logp"] - s["ref_chosen_logp"]) - (s["policy_rejected_logp"] - s["ref_rejected_logp"])

    errors = np.concatenate([np.abs(scores[c] - truth[c]) for c in columns])
    per_token = np.concatenate([np.abs(scores[c] - truth[c]) / np.maximum(n_tokens[c], 1) for c in columns])
    return {
        "mean_abs_error_nats": float(errors.mean()),
        "max_abs_error_nats": float(errors.max()),
        "mean_abs_error_per_token_nats": float(per_token.mean()),
        "margin_mean_abs_error_nats": float(np.abs(margin(scores) - margin(truth)).mean()),
        "reward_accuracy_flips": int((np.sign(margin(scores)) != np.sign(margin(truth))).sum()),
    }


def emulate(paths: dict, subset: Path, device: str) -> dict[str, Any]:
    """Plain unbatched forwards (prompt + completion, TRL's layout): fp32 full precision as a sanity check, and bf16
    weights with the two ways of turning bf16 hidden states into summed log-probs."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from prefdiag.tokenization import tokenize_pairs

    hf_logging.disable_progress_bar()

    rows = [json.loads(line) for line in subset.read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(paths["reference"])
    tok = tokenize_pairs(tokenizer, [r["prompt"] for r in rows], [r["chosen"] for r in rows],
                         [r["rejected"] for r in rows])  # fmt: skip
    out: dict[str, dict[str, np.ndarray]] = {"plain_fp32": {}, "trl_fused_bf16": {}, "naive_bf16": {}}
    for label in ("ref", "policy"):
        path = paths["reference"] if label == "ref" else paths["policy"]
        for dtype in (torch.float32, torch.bfloat16):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
            body, head = model.get_decoder(), model.get_output_embeddings()
            sums = {k: np.zeros((2, len(rows))) for k in ("plain", "fused", "naive")}
            with torch.inference_mode():
                for i in range(len(rows)):
                    prompt = tok.prompt_ids[i]
                    for side, completion in enumerate((tok.chosen_ids[i], tok.rejected_ids[i])):
                        ids = torch.tensor([list(prompt) + list(completion)], device=device)
                        hidden = body(input_ids=ids).last_hidden_state[0]
                        p, n = len(prompt), len(completion)
                        logits = head(hidden[p - 1 : p + n - 1])  # the model's dtype, as TRL's mm tile
                        targets = ids[0, p : p + n, None]
                        if dtype == torch.float32:
                            lp = logits.gather(1, targets).squeeze(1) - torch.logsumexp(logits, -1)
                            sums["plain"][side, i] = lp.double().sum().item()
                        else:
                            f = logits.float()
                            lp = f.gather(1, targets).squeeze(1) - torch.logsumexp(f, -1)
                            sums["fused"][side, i] = lp.sum().item()  # fp32 per token and fp32 sum
                            naive = torch.log_softmax(logits, -1).gather(1, targets).squeeze(1)  # bf16
                            sums["naive"][side, i] = naive.sum().item()  # a bf16 sum
            for key, method in (("plain", "plain_fp32"), ("fused", "trl_fused_bf16"), ("naive", "naive_bf16")):
                if (dtype == torch.float32) == (key == "plain"):
                    out[method][f"{label}_chosen_logp"] = sums[key][0]
                    out[method][f"{label}_rejected_logp"] = sums[key][1]
            del model, body, head
            if device == "cuda":
                torch.cuda.empty_cache()
    return out


def print_precision(result: dict[str, Any]) -> None:
    print(f"\nprecision on {result['pairs']} pairs of shape {result['shape']} ({result['device']}); truth: "
          f"{result['truth']}; mean summed log-prob {result['truth_mean_logp']:.1f} nats over "
          f"{result['mean_completion_tokens']:.0f} tokens; errors in nats")  # fmt: skip
    rows = [
        [name, cell(e["mean_abs_error_nats"], ".2e"), cell(e["max_abs_error_nats"], ".2e"),
         cell(e["mean_abs_error_per_token_nats"], ".2e"), cell(e["margin_mean_abs_error_nats"], ".2e"),
         str(e["reward_accuracy_flips"])]
        for name, e in result["errors"].items()
    ]  # fmt: skip
    headers = ["method", "mean |err|", "max |err|", "per token", "margin |err|", "margin sign flips"]
    print(render_table(headers, rows))


# -- scaling --------------------------------------------------------------------------------------------------------


def scaling(args) -> dict[str, Any]:
    """prefdiag's time per pair at growing pair counts on a model-light shape (first and cached run)."""
    shape = make_models.get_shape(args.scaling_shape, model=args.model, layers=args.layers)
    sizes = [int(s) for s in args.scaling_sizes.split(",")]
    points = []
    for n in sizes:
        paths = ensure_inputs(args, shape, n)
        work = Path(paths["dir"])
        cache = fresh_cache_dir(work / "caches")
        point: dict[str, Any] = {"pairs": n}
        for label in ("first", "second"):
            run = run_prefdiag(f"scaling-{n}-{label}", paths, work, args.device, args.dtype, cache, child_timeout(args),
                               args.prefdiag_args)
            stats = run.get("stats", {})
            point[label] = {
                "process_seconds": run["process_seconds"],
                "cpu_seconds": run["cpu_seconds"],
                "rc": run["rc"],
                "us_per_pair": 1e6 * run["process_seconds"] / n,
                "imports_seconds": stats.get("imports_seconds"),
                "phases_us_per_pair": {k: 1e6 * v["seconds"] / n for k, v in stats.get("phases", {}).items()},
            }
        shutil.rmtree(cache, ignore_errors=True)
        points.append(point)
    growth = {}
    if len(points) >= 2:
        lo, hi = points[0], points[-1]
        for label in ("first", "second"):
            marginal = (hi[label]["process_seconds"] - lo[label]["process_seconds"]) / (hi["pairs"] - lo["pairs"])
            growth[label] = {
                "marginal_us_per_pair": 1e6 * marginal,
                "phase_growth": {  # time per pair at the largest size over the smallest: ~1 linear, >>1 super-linear
                    k: hi[label]["phases_us_per_pair"][k] / v
                    for k, v in lo[label]["phases_us_per_pair"].items()
                    if v > 0 and k in hi[label]["phases_us_per_pair"] and v * lo["pairs"] > 0.05e6
                },
            }
    return {"mode": "scaling", "shape": shape.name, "device": args.device, "points": points, "growth": growth}


def print_scaling(result: dict[str, Any]) -> None:
    print(f"\nscaling on shape {result['shape']} ({result['device']}); phases in microseconds per pair")
    points = result["points"]
    phases = sorted({k for p in points for k in p["first"]["phases_us_per_pair"]})
    phases = [k for k in phases if any(p["first"]["phases_us_per_pair"].get(k, 0) > 20 for p in points)]
    rows = []
    for p in points:
        for label in ("first", "second"):
            r = p[label]
            rows.append([str(p["pairs"]), label, cell(r["process_seconds"], ".2f"), cell(r["cpu_seconds"], ".1f"),
                         cell(r["us_per_pair"], ".0f")]
                        + [cell(r["phases_us_per_pair"].get(k, 0.0), ".0f") for k in phases])  # fmt: skip
    print(render_table(["pairs", "run", "process s", "CPU s", "us/pair", *phases], rows))
    for label, g in result.get("growth", {}).items():
        grow = ", ".join(f"{k} x{v:.2f}" for k, v in g["phase_growth"].items())
        print(f"{label}: marginal {g['marginal_us_per_pair']:.0f} us/pair; per-pair growth smallest->largest: {grow}")


# -- entry point ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="cpu", choices=sorted(make_models.SHAPES))
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "prefdiag-bench"))
    parser.add_argument("--json", type=Path, help="where to write the results")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs", type=int, help="dataset size (default: the shape's)")
    parser.add_argument("--model", choices=sorted(make_models.MODELS), help="run the shape on this model size")
    parser.add_argument("--layers", type=int, help="override the shape's layer count (smoke tests)")
    parser.add_argument("--batch-size", type=int, default=8, help="TRL's per_device_eval_batch_size")
    parser.add_argument("--prefdiag-args", type=shlex.split, default=[],
                        help="extra prefdiag compare options, e.g. '--layout packed --batch-tokens 32768'")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed for each child process")
    parser.add_argument("--deadline", type=float, help="seconds for the whole harness: children are cut to fit")
    parser.add_argument("--peak-flops", type=float, help="the accelerator's peak FLOP/s for MFU (default: by GPU name)")
    parser.add_argument("--prefdiag-src", type=Path, default=REPO,
                        help="directory holding the prefdiag package to benchmark (default: this checkout)")
    parser.add_argument("--prefdiag-rev", help="benchmark prefdiag as committed at this git revision (a snapshot "
                        "extracted under --work), not the working tree")
    parser.add_argument("--side-by-side", action="store_true", help="prefdiag (twice) and TRL evaluate (the default)")
    parser.add_argument("--repeat", type=int, default=1, help="side-by-side repetitions; the median run is reported")
    parser.add_argument("--skip-trl", action="store_true", help="side-by-side without the TRL run")
    parser.add_argument("--skip-second", action="store_true", help="side-by-side without prefdiag's second run")
    parser.add_argument("--precision", action="store_true", help="bf16 errors against fp32 truth")
    parser.add_argument("--precision-pairs", type=int, default=64)
    parser.add_argument("--scaling", action="store_true", help="prefdiag time per pair at growing pair counts")
    parser.add_argument("--scaling-shape", default="tiny", choices=sorted(make_models.SHAPES))
    parser.add_argument("--scaling-sizes", default="1000,10000")
    args = parser.parse_args(argv)
    args.started = time.perf_counter()
    global PREFDIAG_SRC
    PREFDIAG_SRC = snapshot(args.prefdiag_rev, Path(args.work)) if args.prefdiag_rev else args.prefdiag_src.resolve()
    args.device = resolve_device(args.device)
    args.dtype = resolve_dtype(args.dtype, args.device)
    args.build_device = "cuda" if args.device == "cuda" else "cpu"
    if not (args.precision or args.scaling):
        args.side_by_side = True
    shape = make_models.get_shape(args.shape, model=args.model, layers=args.layers)
    results: dict[str, Any] = {"hardware": hardware(args.device), "args": {k: str(v) for k, v in vars(args).items()}}
    modes = [m for m, on in (("side_by_side", args.side_by_side), ("precision", args.precision),
                             ("scaling", args.scaling)) if on]  # fmt: skip
    name = args.scaling_shape if modes == ["scaling"] else shape.name
    path = args.json or Path(args.work) / name / f"results-{'+'.join(modes)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)

    def checkpoint(partial: dict[str, Any] | None = None) -> None:
        """Write what is known so far (a killed run still leaves its finished measurements behind)."""
        record = {**results, **(partial or {}), "harness_seconds": round(time.perf_counter() - args.started, 2)}
        path.write_text(json.dumps(record, indent=2, default=_json_default))

    args.checkpoint = checkpoint
    results["load_average_start"] = os.getloadavg()
    if args.side_by_side:
        results["side_by_side"] = side_by_side(args, shape)
        checkpoint()
        print_side_by_side(results["side_by_side"])
    if args.precision:
        results["precision"] = precision(args, shape)
        checkpoint()
        print_precision(results["precision"])
    if args.scaling:
        results["scaling"] = scaling(args)
        checkpoint()
        print_scaling(results["scaling"])
    results["load_average_end"] = os.getloadavg()
    checkpoint()
    print(f"\nresults: {path}")
    return 0


def _json_default(value: Any) -> Any:
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:
        pass
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
