"""The walls between modules, read from the source: the library never imports the CLI, data loading, the checks,
diagnostics, gate and reports load no model code (and no torch), no import circle; phase names are the listed ones."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from prefdiag import phases

PACKAGE = Path(__file__).resolve().parents[1] / "prefdiag"
SAMPLE = PACKAGE.parent / "sample_data"
MODEL_CODE = ("torch", "transformers", "trl", "peft", "accelerate", "prefdiag.models", "prefdiag.scoring",
              "prefdiag.sources", "prefdiag.scorers", "prefdiag.tokenization", "prefdiag.cli")  # fmt: skip


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Every module a file imports (``from a import b`` counts a.b when that is a module too), lazy imports
    included unless ``top_level_only``; imports under ``if TYPE_CHECKING:`` are left out."""
    found: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                continue
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if not (top_level_only and in_function):
                if isinstance(child, ast.Import):
                    found.update(alias.name for alias in child.names)
                elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                    found.add(child.module)
                    found.update(f"{child.module}.{alias.name}" for alias in child.names)
            visit(child, nested)

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


def _files(*names: str) -> list[Path]:
    paths = []
    for name in names:
        target = PACKAGE / name
        paths += sorted(target.rglob("*.py")) if target.is_dir() else [target.with_suffix(".py")]
    return paths


def _reaches(module_names: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(m for m in module_names if any(m == f or m.startswith(f + ".") for f in forbidden))


def test_the_library_never_imports_the_cli():
    library = [p for p in PACKAGE.rglob("*.py") if "cli" not in p.relative_to(PACKAGE).parts[:1]
               and p.name != "__main__.py"]  # fmt: skip
    offenders = {_module(p): _reaches(_imports(p), ("prefdiag.cli",)) for p in library}
    assert not {m: found for m, found in offenders.items() if found}


@pytest.mark.parametrize("part", ["data", "checks", "flags", "diagnostics", "findings", "formatting", "gate",
                                  "gate_rules", "baseline", "reports", "clean", "unpaired"])  # fmt: skip
def test_model_free_modules_import_no_model_code_even_lazily(part):
    lazy_ok = part == "clean"  # clean scores through prefdiag.api, imported in the function, when given a reference
    for path in _files(part):
        found = _reaches(_imports(path, top_level_only=lazy_ok), MODEL_CODE)
        assert not found, f"{_module(path)} imports {found}"


def test_loading_checking_and_reporting_a_dataset_loads_no_model_code(tmp_path):
    code = f"""
import sys
from prefdiag.data import load_pairs
from prefdiag import checks, diagnostics
from prefdiag.reports.markdown import render_markdown
from prefdiag.reports.html import render_html
pairs = load_pairs({str(SAMPLE / "pairs.jsonl")!r}).table
table = diagnostics.add_pair_metrics(pairs.join(checks.run_checks(pairs)), 0.1)
summary = diagnostics.summarize(table, 0.1)
summary["verdict"] = diagnostics.verdict(summary)
render_markdown(table, summary), render_html(table, summary)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "trl", "peft")
                or m in {MODEL_CODE!r})
assert not loaded, loaded
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr


def test_no_import_circle_among_top_level_imports():
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        # A submodule's import of its own package (``from prefdiag.cli import _options``) is no circle.
        imported = _imports(path, top_level_only=True)
        graph[name] = {m for m in imported if m in modules and m != name and not name.startswith(m + ".")}
    done: set[str] = set()

    def visit(name: str, stack: list[str]) -> None:
        if name in stack:
            raise AssertionError("import circle: " + " -> ".join(stack[stack.index(name):] + [name]))
        if name in done:
            return
        for other in sorted(graph[name]):
            visit(other, stack + [name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_a_phase_must_be_one_of_the_listed_names():
    with phases.phase("load_data"):
        pass
    with pytest.raises(ValueError, match="unknown phase 'load-data'"):
        with phases.phase("load-data"):
            pass
