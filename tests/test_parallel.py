"""`torchrun ... -m prefdiag compare|audit` (gloo, CPU, real processes) gives the single-process table: 1, 2 and 3
processes, a LoRA policy, a cache warm on one rank and cold on the other, a rank killed mid-run then a rerun, two
"nodes" on localhost, and --tp (two ranks on a tiny Llama; refused for a model without a plan)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from prefdiag.cli import app

LOGP_COLUMNS = ["ref_chosen_logp", "ref_rejected_logp", "policy_chosen_logp", "policy_rejected_logp"]
FLOAT_RTOL = 1e-5  # fp32 rounding: batches of other pairs around a pair change the last bits (the layouts' tolerance)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(cache_dir: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path),
            "PREFDIAG_CACHE_DIR": str(cache_dir)}  # fmt: skip


def _torchrun(nproc: int, args: list[str], **launch: str) -> list[str]:
    launch_args = [f"--{k.replace('_', '-')}={v}" for k, v in launch.items()] or [f"--master-port={_free_port()}"]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", *launch_args,
            "-m", "prefdiag", *args]  # fmt: skip


def _run(nproc: int, args: list[str], cache_dir: Path, **launch: str) -> subprocess.CompletedProcess:
    command = _torchrun(nproc, args, **launch)
    return subprocess.run(command, env=_env(cache_dir), capture_output=True, text=True, timeout=600)


def _scoring_args(command: str, pairs_file, out: Path, *models: str) -> list[str]:
    flags = ["-r", models[0], "-p", models[1]] if command == "compare" else ["--reference", models[0]]
    return [command, str(pairs_file), *flags, "--dtype", "float32", "--device", "cpu", "--batch-tokens", "256",
            "-o", str(out), "--format", "json"]  # fmt: skip


def _single(args: list[str], cache_dir: Path, monkeypatch) -> None:
    """The same command in this process (one rank), through typer's CliRunner."""
    monkeypatch.setenv("PREFDIAG_CACHE_DIR", str(cache_dir))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output


def assert_same_run(expected: Path, got: Path, ignore: tuple[str, ...] = ("provenance",)) -> None:
    """Same rows in the same order, identical non-float columns and flags, log-probs to fp32 rounding, and the
    summary equal apart from provenance (floats to the same tolerance)."""
    a, b = pd.read_parquet(expected / "pairs.parquet"), pd.read_parquet(got / "pairs.parquet")
    assert list(a.columns) == list(b.columns) and a["pair_id"].tolist() == b["pair_id"].tolist()
    scale = np.nanmax(np.abs(a[[c for c in LOGP_COLUMNS if c in a]].to_numpy(float)))  # for differences of logps
    for column in a.columns:
        if a[column].dtype.kind == "f":
            np.testing.assert_allclose(b[column], a[column], rtol=FLOAT_RTOL, atol=FLOAT_RTOL * scale, err_msg=column)
            if column in LOGP_COLUMNS:
                np.testing.assert_allclose(b[column], a[column], rtol=FLOAT_RTOL, err_msg=column)
        else:
            assert a[column].astype(str).tolist() == b[column].astype(str).tolist(), column
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (expected, got))
    _assert_close_tree({k: v for k, v in sa.items() if k not in ignore},
                       {k: v for k, v in sb.items() if k not in ignore}, "", scale)  # fmt: skip


def _assert_close_tree(a, b, where: str, scale: float) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for key in a:
            _assert_close_tree(a[key], b[key], f"{where}/{key}", scale)
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close_tree(x, y, f"{where}[{i}]", scale)
    elif isinstance(a, float) and not isinstance(b, bool):
        assert np.isclose(a, b, rtol=FLOAT_RTOL, atol=FLOAT_RTOL * scale, equal_nan=True), (where, a, b)
    else:
        assert a == b, (where, a, b)


@pytest.fixture(scope="module")
def lora_policy(model_dirs, tmp_path_factory) -> str:
    """A LoRA adapter directory on the tiny Llama reference (non-zero weights, so the policy differs)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(model_dirs["llama"]), dtype="float32")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    adapter = tmp_path_factory.mktemp("parallel") / "adapter"
    get_peft_model(base, config).save_pretrained(adapter)
    return str(adapter)


@pytest.fixture(scope="module")
def single_compare(model_dirs, pairs_file, lora_policy, tmp_path_factory) -> Path:
    """prefdiag compare (LoRA policy) in one process, no cache: the table every multi-process run must give."""
    out = tmp_path_factory.mktemp("parallel") / "single"
    args = [*_scoring_args("compare", pairs_file, out, str(model_dirs["llama"]), lora_policy), "--no-cache"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 3])
def test_compare_gives_the_single_process_table(nproc, model_dirs, pairs_file, lora_policy, single_compare, tmp_path):
    out = tmp_path / "out"
    run = _run(nproc, _scoring_args("compare", pairs_file, out, str(model_dirs["llama"]), lora_policy), tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_run(single_compare, out)
    summary = json.loads(run.stdout)  # printed once, by rank 0 alone
    assert summary["provenance"]["world_size"] == nproc
    assert summary["provenance"]["policy"]["tensor_parallel_size"] == 1
    assert summary["provenance"]["reference"]["pairs_from_cache"] == 0
    assert run.stderr.count("wrote pairs.parquet") == 1  # the other ranks print nothing
    bars = [line for line in run.stderr.splitlines() if line.startswith("scoring ")]
    assert len(bars) == 2 and all(" 24/24 pairs" in bar for bar in bars), bars  # rank 0's bar counts every rank
    shards = list((tmp_path).glob("*/shard-*.parquet"))
    assert len(shards) == 2 * nproc  # each rank wrote its own pairs of each model to the cache


@pytest.mark.slow
def test_audit_with_the_cache_warm_on_one_rank_and_cold_on_the_other(model_dirs, pairs_file, tmp_path, monkeypatch):
    from prefdiag import distributed, models
    from prefdiag.tokenization import tokenize_pairs

    reference = str(model_dirs["llama"])
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    tokenized = tokenize_pairs(models.load_tokenizer(reference), *([r[k] for r in rows] for k in ("prompt", "chosen",
                               "rejected")))  # fmt: skip
    lengths = tokenized.prompt_tokens + tokenized.chosen_tokens + tokenized.rejected_tokens
    rank0 = distributed.split_by_tokens(lengths, 2)[0]
    subset = tmp_path / "rank0.jsonl"
    subset.write_text("".join(json.dumps(rows[i]) + "\n" for i in rank0))
    cache = tmp_path / "cache"
    _single(_scoring_args("audit", subset, tmp_path / "warm", reference), cache, monkeypatch)  # rank 0's pairs only
    expected = tmp_path / "expected"
    _single([*_scoring_args("audit", pairs_file, expected, reference), "--no-cache"], cache, monkeypatch)

    out = tmp_path / "out"
    run = _run(2, _scoring_args("audit", pairs_file, out, reference), cache)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_run(expected, out)
    provenance = json.loads((out / "summary.json").read_text())["provenance"]
    assert provenance["reference"]["pairs_from_cache"] == len(rank0)  # rank 0 read all its pairs, rank 1 none
    assert provenance["reference"]["layout"] == "prefix"  # the record of the rank that loaded the model


def _worker_pids(agent: subprocess.Popen) -> dict[int, int]:
    """{local rank: pid} of the workers torchrun's agent started."""
    import psutil

    pids = {}
    for child in psutil.Process(agent.pid).children(recursive=True):
        try:
            env = child.environ()
        except psutil.Error:
            continue
        if "LOCAL_RANK" in env and "TORCHELASTIC_RUN_ID" in env:
            pids[int(env["LOCAL_RANK"])] = child.pid
    return pids


@pytest.mark.slow
def test_a_killed_rank_fails_the_job_and_a_rerun_resumes(model_dirs, pairs_file, lora_policy, tmp_path, monkeypatch):
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    many = tmp_path / "many.jsonl"  # enough pairs that the job lasts while a rank is killed
    many.write_text("".join(json.dumps({**r, "id": f"{r['id']}-{k}", "prompt": f"{k}. {r['prompt']}"}) + "\n"
                            for k in range(8) for r in rows))  # fmt: skip
    out, cache, expected = tmp_path / "out", tmp_path / "cache", tmp_path / "expected"
    args = [*_scoring_args("compare", many, out, str(model_dirs["llama"]), lora_policy), "--layout", "separate"]
    agent = subprocess.Popen(_torchrun(2, args), env=_env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    # The reference pass is over on both ranks once each has written its shard: kill rank 1 there.
    while len(list(cache.glob("*/shard-*.parquet"))) < 2 and agent.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    pids = _worker_pids(agent)
    assert agent.poll() is None and 1 in pids, "the job ended before a rank could be killed"
    os.kill(pids[1], signal.SIGKILL)
    _, stderr = agent.communicate(timeout=300)
    assert agent.returncode != 0
    assert not out.exists() or not any(out.iterdir())  # no partial outputs
    assert "rank      : 1" in stderr and "SIGKILL" in stderr  # torchrun names the failed rank and the signal
    # rank 0 either saw the lost peer first ("Error: a rank stopped before reporting ...") or torchrun's SIGTERM

    _single(args, cache, monkeypatch)  # the rerun, here with one process: the reference comes from the cache
    _single([*args[:args.index("-o")], "-o", str(expected), "--format", "json", "--no-cache"], cache, monkeypatch)
    assert_same_run(expected, out)
    provenance = json.loads((out / "summary.json").read_text())["provenance"]
    assert provenance["reference"]["pairs_from_cache"] == len(rows) * 8
    assert "layout" not in provenance["reference"]  # the reference was not loaded again
    assert provenance["policy"]["layout"] == "separate"  # the policy pass, cut short, was scored again


@pytest.mark.slow
def test_two_nodes_on_localhost(model_dirs, pairs_file, lora_policy, single_compare, tmp_path):
    out, port = tmp_path / "out", _free_port()
    args = _scoring_args("compare", pairs_file, out, str(model_dirs["llama"]), lora_policy)
    launch = dict(nnodes="2", rdzv_backend="c10d", rdzv_endpoint=f"localhost:{port}", rdzv_id="prefdiag-test")
    nodes = [subprocess.Popen(_torchrun(1, args, **launch), env=_env(tmp_path / f"cache{i}"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]  # fmt: skip
    results = [node.communicate(timeout=600) for node in nodes]
    for node, (_, stderr) in zip(nodes, results):
        assert node.returncode == 0, stderr[-3000:]
    assert_same_run(single_compare, out)
    assert sum(bool(stdout.strip()) for stdout, _ in results) == 1  # one node printed the summary
    assert json.loads((out / "summary.json").read_text())["provenance"]["world_size"] == 2


@pytest.mark.slow
def test_tp_2_on_a_tiny_llama_gives_the_single_process_numbers(model_dirs, pairs_file, tmp_path, monkeypatch):
    reference, policy = str(model_dirs["llama"]), str(model_dirs["llama-policy"])
    expected, out = tmp_path / "expected", tmp_path / "out"
    _single([*_scoring_args("compare", pairs_file, expected, reference, policy), "--no-cache"], tmp_path, monkeypatch)
    run = _run(2, [*_scoring_args("compare", pairs_file, out, reference, policy), "--tp", "2"], tmp_path / "cache")
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_run(expected, out)
    provenance = json.loads((out / "summary.json").read_text())["provenance"]
    assert provenance["reference"]["tensor_parallel_size"] == provenance["policy"]["tensor_parallel_size"] == 2


@pytest.mark.slow
def test_tp_on_a_model_without_a_plan_is_exit_2(model_dirs, pairs_file, tmp_path):
    out = tmp_path / "out"
    run = _run(2, [*_scoring_args("audit", pairs_file, out, str(model_dirs["gpt2"])), "--tp", "2"], tmp_path)
    assert run.returncode != 0
    assert "exitcode  : 2" in run.stderr  # each rank's exit status, as torchrun reports it
    errors = [line for line in run.stderr.splitlines() if line.startswith("Error:")]
    assert errors and all("no tensor-parallel plan" in line for line in errors), run.stderr[-3000:]
    assert any("--shard" in line for line in run.stderr.splitlines() if line.startswith("Hint:"))
    assert not out.exists() or not any(out.iterdir())


def test_tp_needs_as_many_processes(model_dirs, pairs_file, tmp_path):
    result = CliRunner().invoke(app, _scoring_args("audit", pairs_file, tmp_path / "o", str(model_dirs["llama"]))
                                + ["--tp", "2"])  # fmt: skip
    assert result.exit_code == 2
    assert "--tp 2 needs exactly 2 processes" in result.output


@pytest.mark.slow
def test_library_call_in_a_process_group_and_a_failing_rank(model_dirs, pairs_file, tmp_path, monkeypatch):
    reference, policy = str(model_dirs["llama"]), str(model_dirs["llama-policy"])
    worker = Path(__file__).with_name("parallel_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={_free_port()}",
               str(worker), str(tmp_path), reference, policy, str(pairs_file)]  # fmt: skip
    run = subprocess.run(command, env=_env(tmp_path / "cache"), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    expected = tmp_path / "expected"
    args = [*_scoring_args("compare", pairs_file, expected, reference, policy), "--no-cache"]
    _single(args, tmp_path / "cache", monkeypatch)
    for name in ("summary.json", "pairs.parquet"):
        assert (tmp_path / "run" / name).exists()
    assert_same_run(expected, tmp_path / "run", ignore=("provenance", "gate"))  # the CLI adds the gate's outcome
    faults = [json.loads((tmp_path / f"fault-{r}.json").read_text()) for r in range(2)]
    # No rank hangs: rank 1 raises its own error (a bad model: exit 2), rank 0 one that names rank 1 and the cause.
    assert [f["type"] for f in faults] == ["RankRefused", "ModelError"]
    assert faults[0]["message"].startswith("rank 1 failed: ") and faults[0]["message"].endswith(faults[1]["message"])
    assert "nan" in faults[1]["message"].lower(), faults


@pytest.mark.slow
def test_accelerate_launch(model_dirs, pairs_file, lora_policy, single_compare, tmp_path):
    out = tmp_path / "out"
    launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2", "--num_machines=1",
              "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={_free_port()}"]  # fmt: skip
    args = _scoring_args("compare", pairs_file, out, str(model_dirs["llama"]), lora_policy)
    run = subprocess.run([sys.executable, *launch, "-m", "prefdiag", *args], env=_env(tmp_path), capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_run(single_compare, out)
    assert json.loads(run.stdout)["provenance"]["world_size"] == 2  # a CPU-only machine: gloo


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_another_ranks_failure_is_printed_once_by_rank_0(rank, printed, monkeypatch, capsys):
    from prefdiag.cli._errors import report_error
    from prefdiag.errors import ModelError
    from prefdiag.parallel import RankFailed, RankRefused

    monkeypatch.setenv("RANK", rank)
    assert report_error(RankFailed("rank 2 failed: RuntimeError: boom")) == 3
    assert report_error(RankRefused("rank 2 failed: bad weights")) == 2
    err = capsys.readouterr().err
    assert ("Error: rank 2 failed: RuntimeError: boom" in err) is printed and ("bad weights" in err) is printed
    assert report_error(ModelError("my own model has NaN weights")) == 2  # a rank's own error: always printed
    assert "my own model has NaN weights" in capsys.readouterr().err
