"""Run the prefdiag CLI exactly as ``python -m prefdiag ARGS`` does, and record where its time and memory went.

    PREFDIAG_BENCH_STATS=stats.json python benchmarks/prefdiag_timed.py compare DATA -r REF -p POL ...

The command line is the CLI's own; nothing in prefdiag is patched. Before the CLI runs, a timer is registered with
``prefdiag.phases.add_listener``, the library's own phase hook (cli_setup, load_data, model_free_checks,
load_tokenizer, tokenize, cache_io, model_identity, load_model, score, diagnostics, write_outputs, print_report).
Time is attributed to the outermost phase only, so nested phases are not counted twice.

The stats file (JSON) holds: ``imports_seconds`` (torch, transformers and the prefdiag modules, imported up front),
``phases`` (seconds and calls per phase), ``wrapper_seconds`` (from this script's first line to the CLI's return;
the harness measures the whole process from outside), ``exit_code``, peak CUDA memory (``torch.cuda
.max_memory_allocated`` / ``max_memory_reserved``, when CUDA was used) and peak RSS.
"""

from __future__ import annotations

import time

_STARTED = time.perf_counter()

import contextlib  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402

_totals: dict[str, float] = {}
_calls: dict[str, int] = {}
_depth = 0


@contextlib.contextmanager
def _timed(phase: str):
    """prefdiag.phases listener: time spent in the outermost phase only, so nested phases are not counted twice."""
    global _depth
    if _depth:
        yield
        return
    _depth += 1
    started = time.perf_counter()
    try:
        yield
    finally:
        _depth -= 1
        _totals[phase] = _totals.get(phase, 0.0) + time.perf_counter() - started
        _calls[phase] = _calls.get(phase, 0) + 1


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
    try:  # what prefdiag.cli.main does before anything imports torch (absent in older revisions)
        from prefdiag.cpu_threads import passive_openmp_waits

        passive_openmp_waits()
    except ImportError:
        pass
    before_imports = time.perf_counter()
    import torch  # noqa: F401
    import transformers  # noqa: F401

    for name in ("prefdiag.data", "prefdiag.checks", "prefdiag.models", "prefdiag.tokenization", "prefdiag.scoring",
                 "prefdiag.cache", "prefdiag.diagnostics", "prefdiag.sources", "prefdiag.scorers", "prefdiag.api",
                 "prefdiag.cli", "prefdiag.cli._output"):  # fmt: skip
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    imports_seconds = time.perf_counter() - before_imports
    from prefdiag import phases

    phases.add_listener(_timed)

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
                **_memory(),
            }
            with open(stats_path, "w") as handle:
                json.dump(stats, handle, indent=2)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
