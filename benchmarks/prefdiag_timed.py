"""Run the prefdiag CLI exactly as ``python -m prefdiag ARGS`` does, and record where its time and memory went.

    PREFDIAG_BENCH_STATS=stats.json python benchmarks/prefdiag_timed.py compare DATA -r REF -p POL ...

The command line is the CLI's own; nothing in prefdiag is changed on disk. Before the CLI runs, prefdiag's main entry
points are wrapped with timers (each function is replaced wherever a prefdiag module holds it, so ``from x import f``
call sites are timed too). Time is attributed to the outermost timed phase only, so nested calls are not counted
twice. Functions that do not exist (the package changes) are skipped and listed under ``not_instrumented``.

The stats file (JSON) holds: ``imports_seconds`` (torch, transformers and the prefdiag modules, imported up front),
``phases`` (seconds and calls per phase), ``wrapper_seconds`` (from this script's first line to the CLI's return;
the harness measures the whole process from outside), ``exit_code``, peak CUDA memory (``torch.cuda
.max_memory_allocated`` / ``max_memory_reserved``, when CUDA was used) and peak RSS.
"""

from __future__ import annotations

import time

_STARTED = time.perf_counter()

import functools  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402

# phase name -> "module:qualified.name" of the functions whose time it collects
PHASES: dict[str, list[str]] = {
    "cli_setup": ["prefdiag.cli._output:setup_logging"],
    "load_data": ["prefdiag.data:load_pairs"],
    "model_free_checks": ["prefdiag.checks:text_features"],
    "load_tokenizer": ["prefdiag.models:load_tokenizer", "prefdiag.models:check_same_vocabulary"],
    "tokenize": ["prefdiag.tokenization:tokenize_pairs"],
    "cache_io": [
        "prefdiag.cache:pair_keys",
        "prefdiag.cache:LogProbCache.load",
        "prefdiag.cache:LogProbCache.flush",
    ],
    "model_identity": ["prefdiag.models:model_identity"],
    "load_model": ["prefdiag.models:load_model", "prefdiag.models:attach_adapter"],
    "score": ["prefdiag.scoring:LogProbScorer.score"],
    "diagnostics": ["prefdiag.diagnostics:add_pair_metrics", "prefdiag.diagnostics:summarize"],
    "write_outputs": ["prefdiag.cli._output:write_outputs"],
    "print_report": ["prefdiag.cli._output:emit"],
}

_totals: dict[str, float] = {}
_calls: dict[str, int] = {}
_depth = 0


def _timed(phase: str, func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        global _depth
        if _depth:
            return func(*args, **kwargs)
        _depth += 1
        started = time.perf_counter()
        try:
            return func(*args, **kwargs)
        finally:
            _depth -= 1
            _totals[phase] = _totals.get(phase, 0.0) + time.perf_counter() - started
            _calls[phase] = _calls.get(phase, 0) + 1

    wrapper.__prefdiag_bench_original__ = func
    return wrapper


def _instrument() -> list[str]:
    """Wrap every function in PHASES; return the ones that could not be found."""
    missing, replaced = [], {}
    for phase, targets in PHASES.items():
        for target in targets:
            module_name, qualname = target.split(":")
            try:
                owner = importlib.import_module(module_name)
                *path, name = qualname.split(".")
                for part in path:
                    owner = getattr(owner, part)
                original = getattr(owner, name)
            except (ImportError, AttributeError):
                missing.append(target)
                continue
            wrapped = _timed(phase, original)
            setattr(owner, name, wrapped)
            replaced[id(original)] = (original, wrapped)
    # functions bound by ``from module import name`` in other prefdiag modules
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith("prefdiag"):
            continue
        for attr, value in list(vars(module).items()):
            hit = replaced.get(id(value))
            if hit is not None and hit[0] is value:
                setattr(module, attr, hit[1])
    return missing


def _memory() -> dict[str, float | None]:
    out: dict[str, float | None] = {
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "cuda_max_allocated_gib": None,
        "cuda_max_reserved_gib": None,
    }
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_max_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        out["cuda_max_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    return out


def main() -> int:
    before_imports = time.perf_counter()
    import torch  # noqa: F401
    import transformers  # noqa: F401

    for name in ("prefdiag.data", "prefdiag.checks", "prefdiag.models", "prefdiag.tokenization", "prefdiag.scoring",
                 "prefdiag.cache", "prefdiag.diagnostics", "prefdiag.api", "prefdiag.cli", "prefdiag.cli._output"):  # fmt: skip
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    imports_seconds = time.perf_counter() - before_imports
    missing = _instrument()

    from prefdiag.cli import main as cli_main

    sys.argv = ["prefdiag", *sys.argv[1:]]
    exit_code = 0
    try:
        cli_main()
    except SystemExit as exc:
        exit_code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        stats_path = os.environ.get("PREFDIAG_BENCH_STATS")
        if stats_path:
            wrapper_seconds = time.perf_counter() - _STARTED
            stats = {
                "argv": sys.argv[1:],
                "exit_code": exit_code,
                "wrapper_seconds": round(wrapper_seconds, 4),
                "imports_seconds": round(imports_seconds, 4),
                "phases": {k: {"seconds": round(v, 4), "calls": _calls[k]} for k, v in _totals.items()},
                "other_seconds": round(wrapper_seconds - imports_seconds - sum(_totals.values()), 4),
                "not_instrumented": missing,
                **_memory(),
            }
            with open(stats_path, "w") as handle:
                json.dump(stats, handle, indent=2)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
