"""A one-pair compare pays no fixed cost it does not need: no matplotlib, no from_pretrained for local safetensors
checkpoints, one tokenizer, and AutoConfig only where transformers' tokenizer and model building ask for it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, sys
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
calls = {}
def counted(cls, owner, name):
    original = getattr(cls, name).__func__
    def wrapper(klass, *args, **kwargs):
        calls[owner] = calls.get(owner, 0) + 1
        return original(klass, *args, **kwargs)
    setattr(cls, name, classmethod(wrapper))
counted(AutoConfig, "AutoConfig", "from_pretrained")
counted(AutoModelForCausalLM, "AutoModelForCausalLM", "from_pretrained")
counted(AutoTokenizer, "AutoTokenizer", "from_pretrained")
from prefdiag.cli import app
try:
    app(sys.argv[2:], standalone_mode=False)
finally:
    calls["matplotlib"] = any(m == "matplotlib" or m.startswith("matplotlib.") for m in sys.modules)
    open(sys.argv[1], "w").write(json.dumps(calls))
"""


def test_a_one_pair_compare_loads_each_thing_once_and_imports_no_plotting_library(model_dirs, pairs_file, tmp_path):
    one = tmp_path / "one.jsonl"
    one.write_text(pairs_file.read_text().splitlines()[0] + "\n")
    out = tmp_path / "calls.json"
    source = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PREFDIAG_CACHE_DIR=str(tmp_path / "cache"), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([source, os.environ.get("PYTHONPATH", "")]))
    args = ["compare", str(one), "-r", str(model_dirs["llama"]), "-p", str(model_dirs["llama-policy"]),
            "--device", "cpu", "-q", "-o", str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run([sys.executable, "-c", CHILD, str(out), *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    calls = json.loads(out.read_text())
    assert calls["matplotlib"] is False  # the report's plots are SVG written by prefdiag
    assert calls.get("AutoModelForCausalLM", 0) == 0  # both local safetensors checkpoints take the fast path
    assert calls.get("AutoTokenizer", 0) == 1  # the policy's vocabulary is compared from its files
    assert calls.get("AutoConfig", 0) <= 3  # the tokenizer's, and one per model built; none to compare vocabularies
    assert (tmp_path / "out" / "summary.json").is_file()


def test_the_command_line_chooses_openmp_waits_before_torch_loads():
    probe = ("import os, sys\nimport prefdiag.cli as cli\nfrom prefdiag import cpu_threads\n"
             "cpu_threads.os.getloadavg = lambda: (float(sys.argv[1]), 0.0, 0.0)\n"
             "cli.app = lambda: print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)\ncli.main()")
    source = str(Path(__file__).resolve().parent.parent)
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = os.pathsep.join([source, os.environ.get("PYTHONPATH", "")])

    def policy(load: float, **extra: str) -> list[str]:
        done = subprocess.run([sys.executable, "-c", probe, str(load)], env={**env, **extra}, capture_output=True,
                              text=True, timeout=120)
        return done.stdout.split() or [done.stderr[-2000:]]

    busy = float(len(os.sched_getaffinity(0)))
    assert policy(busy) == ["PASSIVE", "False"]  # a CPU busy with other work: threads sleep while they wait
    assert policy(0.0) == ["None", "False"]  # a quiet one: OpenMP's own default
    assert policy(busy, OMP_WAIT_POLICY="ACTIVE") == ["ACTIVE", "False"]  # the user's own choice is kept
