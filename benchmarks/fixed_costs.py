"""Where a short ``prefdiag compare`` spends its fixed costs (issue 15), from measurements that depend little on load.

Three parts, each in fresh child processes; nothing in prefdiag is patched:

``imports``
    ``python -X importtime -m prefdiag compare ONE -r REF -p POL -q -o OUT`` on a one-pair file. Every top-level
    package's cumulative import time and share of all import time; for the packages in ``UNNEEDED`` (ones a
    one-pair compare has no use for), where prefdiag imports them: the same command under ``--trace-imports``
    (this script as a wrapper: a ``sys.meta_path`` finder that only looks, never finds, records the innermost
    prefdiag frame (file:line) on the stack the first time each top-level package is imported).
``loads``
    The same command under a ``sys.setprofile`` hook counting every call of a function named ``from_pretrained``
    (by class), every safetensors read, and each one's prefdiag call site.
``weights``
    For the reference model: ``safetensors.torch.load_file`` against ``AutoModelForCausalLM.from_pretrained``
    (first call in the process, then a second one), in one process after the imports, median of ``--repeat``.

    python benchmarks/fixed_costs.py                                   # sample_data/models, first sample pair
    python benchmarks/fixed_costs.py --reference R --policy P --data one.jsonl --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# Top-level packages a one-pair `compare` (tokenize, score two models, write parquet/JSON/Markdown/HTML/JUnit) does
# not need: what they are there for is in the note.
UNNEEDED = {
    "datasets": "hub / save_to_disk datasets only",
    "peft": "LoRA adapters only",
    "accelerate": "--shard (device_map) only",
    "matplotlib": "the HTML report's plots, if they were drawn in the browser",
    "PIL": "matplotlib's image backend",
    "scipy": "nothing prefdiag calls",
    "sklearn": "nothing prefdiag calls",
    "sympy": "torch's symbolic shapes (torch.compile) only",
    "trl": "the TRL integration only",
    "rapidfuzz": "the near-duplicate check (audit)",
    "jinja2": "the chat template (conversational data) and the HTML report",
    "pyarrow.dataset": "multi-file datasets only",
    "pyarrow.json": "JSON input via Arrow",
    "requests": "the hub",
    "httpx": "the hub",
    "huggingface_hub": "hub ids only (local directories here)",
    "torch._dynamo": "torch.compile (the packed layout on CUDA)",
    "torch.distributed": "multi-process runs",
    "torchvision": "nothing",
    "pydantic": "nothing prefdiag calls",
    "pyarrow.compute": "nothing a one-pair run calls",
    "safetensors": None,  # needed: listed for its share only
}


# Loading one tokenizer and two models through transformers, nothing else: what any transformers-based scorer imports.
FLOOR = ("import sys, torch, transformers; from transformers import AutoModelForCausalLM, AutoTokenizer; "
         "AutoTokenizer.from_pretrained(sys.argv[1]); "
         "[AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32) for p in sys.argv[1:]]")


# -- wrapper modes (run inside the child) ---------------------------------------------------------------------------


def _prefdiag_frame(frame) -> str | None:
    """file:line of the innermost prefdiag frame on the stack (not this script's)."""
    while frame is not None:
        name = frame.f_code.co_filename
        if f"{os.sep}prefdiag{os.sep}" in name and "benchmarks" not in name:
            return f"{name.split(os.sep + 'prefdiag' + os.sep, 1)[1]}:{frame.f_lineno}"
        frame = frame.f_back
    return None


class _ImportWitness:
    """A meta-path finder that finds nothing: it notes who first imports each watched module, then steps aside."""

    def __init__(self, watched: set[str]) -> None:
        self.watched, self.seen = watched, {}

    def find_spec(self, fullname, path=None, target=None):
        top = fullname.split(".")[0]
        for key in (fullname, top):
            if key in self.watched and key not in self.seen:
                frame = sys._getframe(1)
                importer = None
                while frame is not None:  # the first frame outside importlib: the import statement
                    if "importlib" not in frame.f_code.co_filename and "<frozen" not in frame.f_code.co_filename:
                        importer = f"{frame.f_code.co_filename}:{frame.f_lineno}"
                        break
                    frame = frame.f_back
                self.seen[key] = {"prefdiag": _prefdiag_frame(sys._getframe(1)), "importer": importer}
        return None


def _run_cli(argv: list[str]) -> int:
    sys.argv = ["prefdiag", *argv]
    try:
        runpy.run_module("prefdiag", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0
    return 0


def trace_imports(out: str, argv: list[str]) -> int:
    witness = _ImportWitness(set(UNNEEDED))
    sys.meta_path.insert(0, witness)
    code = _run_cli(argv)
    Path(out).write_text(json.dumps({"exit_code": code, "importers": witness.seen}, indent=2))
    return code


def count_loads(out: str, argv: list[str]) -> int:
    """Count from_pretrained calls (by the class they are called on) and safetensors reads, with call sites."""
    calls: list[dict[str, Any]] = []
    watched = {"from_pretrained", "load_file", "safe_open", "load_state_dict", "_load_state_dict_into_meta_model"}

    def profiler(frame, event, arg):
        if event == "c_call" and getattr(arg, "__name__", None) in watched:  # a builtin (safetensors' safe_open)
            calls.append({"function": getattr(arg, "__qualname__", arg.__name__), "defined_in": "builtin",
                          "prefdiag_site": _prefdiag_frame(frame), "caller": None})  # fmt: skip
            return
        if event != "call":
            return
        code = frame.f_code
        if code.co_name not in watched:
            return
        owner = frame.f_locals.get("cls") or frame.f_locals.get("self")
        owner_name = owner.__name__ if isinstance(owner, type) else type(owner).__name__ if owner is not None else ""
        calls.append({
            "function": f"{owner_name + '.' if owner_name else ''}{code.co_name}",
            "defined_in": f"{code.co_filename.split('site-packages' + os.sep)[-1]}:{code.co_firstlineno}",
            "prefdiag_site": _prefdiag_frame(frame),
            "caller": f"{frame.f_back.f_code.co_filename.split('site-packages' + os.sep)[-1]}:{frame.f_back.f_lineno}"
            if frame.f_back else None,
        })  # fmt: skip

    sys.setprofile(profiler)
    try:
        code = _run_cli(argv)
    finally:
        sys.setprofile(None)
    Path(out).write_text(json.dumps({"exit_code": code, "calls": calls}, indent=2))
    return code


def weights_child(out: str, reference: str, repeat: int) -> int:
    """In one process, after the imports: load_file, then from_pretrained (first, then later calls)."""
    started = time.perf_counter()
    import safetensors.torch
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    imports = time.perf_counter() - started
    files = sorted(Path(reference).glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    timings: dict[str, list[float]] = {"read_bytes": [], "load_file": [], "from_pretrained_first": [],
                                       "from_pretrained_again": [], "from_config_load_state_dict": []}  # fmt: skip
    for _ in range(repeat):
        t = time.perf_counter()
        for f in files:
            f.read_bytes()
        timings["read_bytes"].append(time.perf_counter() - t)
        t = time.perf_counter()
        for f in files:  # touch every tensor: load_file may hand back views of a memory map
            sum(float(x.view(-1)[-1]) for x in safetensors.torch.load_file(str(f)).values())
        timings["load_file"].append(time.perf_counter() - t)
    import importlib

    from transformers import AutoConfig

    t = time.perf_counter()
    model_type = AutoConfig.from_pretrained(reference).model_type
    importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    importlib.import_module("transformers.masking_utils")
    timings["import_modeling_code"] = [time.perf_counter() - t]
    for i in range(repeat + 1):
        t = time.perf_counter()
        AutoModelForCausalLM.from_pretrained(reference, attn_implementation="sdpa", dtype=torch.float32)
        key = "from_pretrained_first" if i == 0 else "from_pretrained_again"
        timings[key].append(time.perf_counter() - t)
    # the alternative: build the module without initialising weights, then assign the tensors load_file returns
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(reference)
    for _ in range(repeat):
        t = time.perf_counter()
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
        state: dict[str, Any] = {}
        for f in files:
            state.update(safetensors.torch.load_file(str(f)))
        model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()
        model.eval()
        timings["from_config_load_state_dict"].append(time.perf_counter() - t)
    Path(out).write_text(json.dumps({"imports_seconds": imports, "bytes": size, "timings": timings}, indent=2))
    return 0


# -- the driver -----------------------------------------------------------------------------------------------------


def parse_importtime(stderr: str) -> list[dict[str, Any]]:
    """-X importtime lines as {module, self_us, cumulative_us, depth}."""
    rows = []
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m:
            rows.append({"self_us": int(m.group(1)), "cumulative_us": int(m.group(2)),
                         "depth": len(m.group(3)) // 2, "module": m.group(4)})  # fmt: skip
    return rows


def import_tree(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The import tree: -X importtime prints each import after the ones it triggered, one level deeper."""
    pending: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        row["children"] = pending.pop(row["depth"] + 1, [])
        pending.setdefault(row["depth"], []).append(row)
    return pending.get(1, []) + pending.get(0, [])


def _matches(module: str, key: str) -> bool:
    return module == key or module.startswith(key + ".")


def import_shares(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Self time summed per top-level package (what importing it cost, wherever it happened); and for each watched
    package the cumulative time of its outermost imports (what it pulled in included) with the chain of imports
    that led to the first one."""
    total = sum(r["self_us"] for r in rows)
    per_package: dict[str, int] = {}
    for r in rows:
        top = r["module"].split(".")[0]
        per_package[top] = per_package.get(top, 0) + r["self_us"]
    watched: dict[str, dict[str, Any]] = {}

    def walk(node: dict[str, Any], chain: list[str]) -> None:
        for key in UNNEEDED:
            if _matches(node["module"], key) and not any(_matches(c, key) for c in chain):
                entry = watched.setdefault(key, {"cumulative_us": 0, "first_chain": chain + [node["module"]]})
                entry["cumulative_us"] += node["cumulative_us"]
        for child_node in node["children"]:
            walk(child_node, chain + [node["module"]])

    for root in import_tree(rows):
        walk(root, [])
    return {
        "total_self_seconds": total / 1e6,
        "by_package_self_seconds": dict(sorted(((k, v / 1e6) for k, v in per_package.items()), key=lambda kv: -kv[1])),
        "watched_cumulative_seconds": {k: v["cumulative_us"] / 1e6 for k, v in
                                       sorted(watched.items(), key=lambda kv: -kv[1]["cumulative_us"])},
        "watched_first_chain": {k: v["first_chain"] for k, v in watched.items()},
    }


def beyond_baseline(baseline: list[dict[str, Any]], run: list[dict[str, Any]]) -> dict[str, Any]:
    """Modules the run imports that ``python -c "import torch, transformers"`` does not, self time summed by
    package (two levels: ``transformers.models``, ``torch._dynamo``, ``sympy``...)."""
    seen = {r["module"] for r in baseline}
    extra = [r for r in run if r["module"] not in seen]
    groups: dict[str, float] = {}
    for r in extra:
        parts = r["module"].split(".")
        split = parts[0] in ("torch", "transformers", "prefdiag", "pyarrow", "pandas")  # big ones: two levels
        key = ".".join(parts[:2]) if split else parts[0]
        groups[key] = groups.get(key, 0.0) + r["self_us"] / 1e6
    return {
        "baseline_seconds": sum(r["self_us"] for r in baseline) / 1e6,
        "extra_modules": len(extra),
        "extra_seconds": sum(r["self_us"] for r in extra) / 1e6,
        "by_group_seconds": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
    }


def child(cmd: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=900)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", default=str(REPO / "sample_data/models/reference"))
    parser.add_argument("--policy", default=str(REPO / "sample_data/models/policy"))
    parser.add_argument("--data", help="a one-pair file (default: the first pair of sample_data/pairs.jsonl)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, help="results (default: <tmp>/prefdiag-fixed-costs.json)")
    parser.add_argument("--prefdiag-src", type=Path, default=REPO)
    parser.add_argument("--weights-child", metavar="OUT", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["--trace-imports"], ["--count-loads"]):  # wrapper modes: MODE OUT PREFDIAG-ARGS...
        return (trace_imports if argv[0] == "--trace-imports" else count_loads)(argv[1], argv[2:])
    args = parser.parse_args(argv)
    if args.weights_child:
        return weights_child(args.weights_child, args.reference, args.repeat)

    work = Path(tempfile.mkdtemp(prefix="prefdiag-fixed-costs-"))
    data = Path(args.data) if args.data else work / "one.jsonl"
    if not args.data:
        data.write_text((REPO / "sample_data/pairs.jsonl").read_text().splitlines()[0] + "\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(args.prefdiag_src.resolve()), *filter(None, [env.get("PYTHONPATH")])])

    def cli_args(tag: str) -> list[str]:
        env["PREFDIAG_CACHE_DIR"] = str(work / f"cache-{tag}")  # cold every time
        return ["compare", str(data), "-r", args.reference, "-p", args.policy, "--device", "cpu", "--dtype",
                "float32", "-q", "-o", str(work / f"out-{tag}")]  # fmt: skip

    result: dict[str, Any] = {"data": str(data), "reference": args.reference, "policy": args.policy}
    samples = []
    for i in range(args.repeat):
        started = time.perf_counter()
        done = child([sys.executable, "-X", "importtime", "-m", "prefdiag", *cli_args(f"it{i}")], env, work)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"prefdiag failed:\n{done.stderr[-3000:]}")
        rows = parse_importtime(done.stderr)
        samples.append({"process_seconds": seconds, **import_shares(rows), "rows": rows})
    best = min(samples, key=lambda s: s["total_self_seconds"])  # the least disturbed run
    base = child([sys.executable, "-X", "importtime", "-c", "import torch, transformers"], env, work)
    floor = child([sys.executable, "-X", "importtime", "-c", FLOOR, args.reference, args.policy], env, work)
    run_rows, base_rows, floor_rows = best.pop("rows"), parse_importtime(base.stderr), parse_importtime(floor.stderr)
    result["beyond_baseline"] = beyond_baseline(base_rows, run_rows)
    # what transformers itself imports to load one tokenizer and two models, beyond `import torch, transformers`
    result["floor_beyond_baseline"] = beyond_baseline(base_rows, floor_rows)
    # what prefdiag imports beyond what loading one tokenizer and two models through transformers imports anyway
    result["beyond_floor"] = beyond_baseline(floor_rows, run_rows)
    for sample in samples:
        sample.pop("rows", None)
    result["imports"] = {"runs": len(samples), "process_seconds": [s["process_seconds"] for s in samples],
                         "total_import_seconds": [s["total_self_seconds"] for s in samples], "least_disturbed": best}

    done = child([sys.executable, str(Path(__file__).resolve()), "--trace-imports", str(work / "importers.json"),
                  *cli_args("trace")], env, work)  # fmt: skip
    result["importers"] = json.loads((work / "importers.json").read_text())["importers"] if done.returncode == 0 \
        else {"error": done.stderr[-2000:]}
    done = child([sys.executable, str(Path(__file__).resolve()), "--count-loads", str(work / "loads.json"),
                  *cli_args("loads")], env, work)  # fmt: skip
    if done.returncode == 0:
        calls = json.loads((work / "loads.json").read_text())["calls"]
        counts: dict[str, int] = {}
        for c in calls:
            counts[c["function"]] = counts.get(c["function"], 0) + 1
        result["loads"] = {"counts": counts, "calls": calls}
    else:
        result["loads"] = {"error": done.stderr[-2000:]}
    done = child([sys.executable, str(Path(__file__).resolve()), "--weights-child", str(work / "weights.json"),
                  "--reference", args.reference, "--repeat", str(args.repeat)], env, work)  # fmt: skip
    if done.returncode == 0:
        w = json.loads((work / "weights.json").read_text())
        med = {k: statistics.median(v) for k, v in w["timings"].items()}
        w["median_seconds"] = med
        w["over_read_bytes"] = {k: med[k] / med["read_bytes"] for k in med if k.startswith(("from_", "load_"))}
        result["weights"] = w
    else:
        result["weights"] = {"error": done.stderr[-2000:]}

    path = args.json or Path(tempfile.gettempdir()) / "prefdiag-fixed-costs.json"
    path.write_text(json.dumps(result, indent=2))
    print_summary(result)
    print(f"\nresults: {path}")
    return 0


def print_summary(result: dict[str, Any]) -> None:
    imports = result["imports"]["least_disturbed"]
    total = imports["total_self_seconds"]
    print(f"imports: {total:.2f} s of import time in the least disturbed of {result['imports']['runs']} runs "
          f"(processes took {', '.join(f'{s:.1f}' for s in result['imports']['process_seconds'])} s)")
    for key, what in (("beyond_baseline", "`import torch, transformers`"),
                      ("floor_beyond_baseline", "`import torch, transformers`, for the floor alone"),
                      ("beyond_floor", "the floor (one AutoTokenizer, two AutoModelForCausalLM loads)")):
        extra = result.get(key)
        if extra:
            print(f"\nbeyond {what} ({extra['baseline_seconds']:.2f} s of imports): {extra['extra_modules']} more "
                  f"modules, {extra['extra_seconds']:.2f} s of import time; by package:")
            for name, seconds in list(extra["by_group_seconds"].items())[:20]:
                print(f"  {name:<34}{seconds:7.3f} s  {seconds / max(extra['extra_seconds'], 1e-9):6.1%}")
    print("\nby top-level package (self time summed; share of all import time):")
    for name, seconds in list(imports["by_package_self_seconds"].items())[:15]:
        print(f"  {name:<22}{seconds:7.3f} s  {seconds / total:6.1%}")
    print("\nunneeded modules (cumulative time of their outermost import; where prefdiag imports them):")
    importers = result.get("importers", {})
    for name, seconds in imports["watched_cumulative_seconds"].items():
        site = importers.get(name, {}) if isinstance(importers, dict) else {}
        why = UNNEEDED.get(name) or "needed"
        chain = " > ".join(imports["watched_first_chain"].get(name, [])[-7:])
        print(f"  {name:<18}{seconds:7.3f} s  {seconds / total:6.1%}  prefdiag: {site.get('prefdiag')}; "
              f"import statement: {site.get('importer')}  ({why})\n{'':<22}chain: ... {chain}")
    loads = result.get("loads", {})
    print("\ncalls in one compare:", json.dumps(loads.get("counts", loads)))
    for c in loads.get("calls", []):
        print(f"  {c['function']:<44} from prefdiag {c['prefdiag_site']}  (caller {c['caller']})")
    w = result.get("weights", {})
    if "median_seconds" in w:
        m = w["median_seconds"]
        print(f"\nweights ({w['bytes'] / 2**20:.1f} MiB), median ms: " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in
              m.items()) + "; over reading the bytes: " + ", ".join(f"{k} {v:.1f}x" for k, v in w["over_read_bytes"]
              .items()))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
