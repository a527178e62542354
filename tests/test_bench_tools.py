"""The benchmark tools' own logic (benchmarks/): import-time accounting, the matrix's summary and table, the shapes."""

from __future__ import annotations

import sys
from pathlib import Path

from pytest import approx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_matrix  # noqa: E402
import fixed_costs  # noqa: E402
import make_models  # noqa: E402

# -X importtime prints an import after the ones it triggered, one indentation level deeper
IMPORTTIME = """import time: self [us] | cumulative | imported package
import time:       100 |        100 |     sympy.core
import time:       200 |        300 |   sympy
import time:        50 |        350 | torch.fx
import time:        10 |         10 | matplotlib
import time:         5 |          5 | sympy.extra
"""


def test_import_shares_count_each_package_once_at_its_outermost_import():
    rows = fixed_costs.parse_importtime(IMPORTTIME)
    assert [(r["module"], r["depth"]) for r in rows][:3] == [("sympy.core", 2), ("sympy", 1), ("torch.fx", 0)]
    shares = fixed_costs.import_shares(rows)
    assert shares["total_self_seconds"] == approx(365e-6)
    assert shares["by_package_self_seconds"]["sympy"] == approx(305e-6)
    # sympy.core is inside sympy's 300 us; the later top-level sympy.extra import adds its own 5
    assert shares["watched_cumulative_seconds"]["sympy"] == approx(305e-6)
    assert shares["watched_first_chain"]["sympy"] == ["torch.fx", "sympy"]
    assert shares["watched_cumulative_seconds"]["matplotlib"] == approx(10e-6)


def test_beyond_baseline_keeps_only_modules_the_baseline_did_not_import():
    baseline = fixed_costs.parse_importtime(IMPORTTIME.splitlines()[0] + "\nimport time:  50 |  50 | torch.fx\n")
    extra = fixed_costs.beyond_baseline(baseline, fixed_costs.parse_importtime(IMPORTTIME))
    assert extra["extra_modules"] == 4
    assert extra["by_group_seconds"] == approx({"sympy": 305e-6, "matplotlib": 10e-6})


def test_chat_shape_makes_conversations_and_a_chatml_tokenizer_config():
    shape = make_models.get_shape("chat", model="half", layers=1)
    assert (shape.hidden, shape.layers, shape.chat) == (128, 1, True)
    pairs = make_models.make_pairs(shape, 5, seed=3)
    for pair in pairs:
        assert [m["role"] for m in pair["prompt"]] == ["system", "user", "assistant", "user"]
        words = sum(len(m["content"].split()) for m in pair["prompt"])
        assert shape.prompt_words[0] <= words <= shape.prompt_words[1]
        assert [m["role"] for m in pair["chosen"]] == ["assistant"] == [m["role"] for m in pair["rejected"]]
    specials = make_models.special_tokens(shape)
    assert (specials["bos"], specials["eos"]) == (None, "<|im_end|>")
    config = shape.config()
    assert config.bos_token_id is None and config.eos_token_id == shape.vocab - 1
    assert isinstance(make_models.make_pairs(make_models.get_shape("short"), 2)[0]["prompt"], str)


def _record(cold: float, warm: float, trl: float, score: float, evaluate: float) -> dict:
    stats = {"imports_seconds": 1.0, "phases": {"score": {"seconds": score, "calls": 2}}, "other_seconds": 0.1}
    return {
        "pairs": 160,
        "runs": {
            "prefdiag_first": {"rc": 0, "process_seconds": cold, "stats": stats},
            "prefdiag_second": {"rc": 0, "process_seconds": warm, "stats": {"phases": {}}},
            "trl": {"rc": 0, "process_seconds": trl, "result": {"evaluate_seconds": evaluate, "trl_version": "1.16.0"}},
        },
        "work": {"tokens": 1000, "tokens_as_trl_computes_them": 1500, "mean_prompt_tokens": 160.0,
                 "mean_response_tokens": 10.0},
        "ratios": {"prefdiag_over_trl": cold / trl, "prefdiag_over_trl_cpu_time": 0.4},
        "agreement_max_abs_nats": {"max": 3e-5},
    }  # fmt: skip


def test_cell_summary_ratios_and_the_markdown_verdicts():
    summary = bench_matrix.cell_summary(_record(cold=9.0, warm=3.0, trl=10.0, score=2.0, evaluate=4.0))
    assert summary["ok"] and summary["cold_over_trl"] == approx(0.9) and summary["warm_over_trl"] == approx(0.3)
    assert summary["score_pairs_per_s_over_trl"] == approx(2.0)
    assert summary["score_tokens_per_s_over_trl"] == approx((1000 / 2.0) / (1500 / 4.0))
    result = {
        "hardware": {"cpu_model": "Test CPU", "cpu_count": 2}, "model_description": "Llama, 4 layers",
        "load_average_start": [0.5], "load_average_end": [0.7], "harness_seconds": 60.0, "left_out": [],
        "cells": [{"shape": "short", "pairs": 160, "summary": summary,
                   "record": _record(9.0, 3.0, 10.0, 2.0, 4.0)}],
    }  # fmt: skip
    text = bench_matrix.markdown(result)
    row = next(line for line in text.splitlines() if line.startswith("| `short` | 160 "))
    assert "0.90 **not met**" in row and "0.30 met" in row and "2.00 met" in row and "3.0e-05" in row
    assert "TRL 1.16.0" in text and "Test CPU" in text
