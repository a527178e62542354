"""prefdiag.distributed, and PrefdiagCallback under two real processes (torchrun, gloo, CPU)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_trl_callback import LOGGED, PREFIX, assert_matches_compare

from prefdiag import api, distributed


def test_single_process_without_a_group():
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    out = distributed.gather_pairs(4, np.array([2, 0]), {"x": np.array([5.0, 7.0])})
    assert out["x"][[0, 2]].tolist() == [7.0, 5.0] and np.isnan(out["x"][[1, 3]]).all()


def test_split_is_token_balanced_and_deterministic():
    lengths = [100, 1, 1, 1, 50, 50, 2, 3]
    shares = distributed.split_by_tokens(lengths, 2)
    assert sorted(np.concatenate(shares).tolist()) == list(range(8))
    loads = [sum(lengths[i] for i in s) for s in shares]
    assert loads == [104, 104]  # the 100-token pair on one rank, both 50s on the other, the short ones to even out
    assert [s.tolist() for s in shares] == [s.tolist() for s in distributed.split_by_tokens(lengths, 2)]
    assert [s.tolist() for s in distributed.split_by_tokens(lengths, 1)] == [list(range(8))]
    assert [len(s) for s in distributed.split_by_tokens([1, 1], 3)] == [1, 1, 0]  # more ranks than pairs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_callback_with_two_processes(model_dirs, pairs_file, tmp_path):
    worker = Path(__file__).with_name("distributed_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
        str(worker), str(tmp_path), str(model_dirs["llama"]), str(pairs_file),
    ]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["before_group"] == [0, 1] and result["rank_world"] == [0, 2]
    assert result["gathered"] == result["to_root"] == [float(i * i) for i in range(10)]
    assert sorted(result["shares"][0] + result["shares"][1]) == list(range(10))
    history = result["history"]
    assert [h["step"] for h in history] == [0, 2]
    assert json.loads((tmp_path / "other-rank-history.json").read_text()) == history  # every rank, same numbers
    for logged in history:
        checkpoint = tmp_path / "run" / f"checkpoint-{logged['step']}"
        policy = str(checkpoint) if logged["step"] else str(model_dirs["llama"])
        summary = api.compare(str(pairs_file), str(model_dirs["llama"]), policy,
                              api.RunOptions(beta=0.5, dtype="float32", device="cpu", cache=False)).summary
        assert_matches_compare(summary, logged)
    assert history[0][PREFIX + "reward_accuracy"] == 0.0  # at the start the policy is the reference
    assert set(LOGGED.values()) >= {k[len(PREFIX):] for k in history[-1] if k.startswith(PREFIX)}
    assert (tmp_path / "pairs" / "pairs-step-2.parquet").exists()
