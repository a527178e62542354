"""The CHES correlation experiment runs end to end in its CI-size form: TRL's DPOTrainer trains the shipped
reference, and every predictor gets a Spearman correlation with the measured change of the chosen log-prob."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pandas as pd

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "ches_correlation" / "run.py"


def _script():
    spec = importlib.util.spec_from_file_location("ches_correlation_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_reports_a_correlation_for_every_predictor(tmp_path, capsys):
    script = _script()
    output = tmp_path / "tiny.json"
    assert script.main(["--tiny", "--output", str(output)]) == 0
    result = json.loads(output.read_text())
    assert result["pairs"] == 32
    correlations = result["correlation_with_chosen_logp_change"]
    assert set(correlations) == set(script.PREDICTORS)
    for values in correlations.values():
        assert -1.0 <= values["spearman"] <= 1.0 and 0.0 <= values["p_approx"] <= 1.0
    table = pd.read_csv(output.with_suffix(".csv"))
    assert len(table) == 32 and table["ches_norm"].notna().all()
    assert table["chosen_logp_change"].abs().max() > 0  # training moved the policy
    # the percentile column and the value rank alike, so their correlations agree
    assert math.isclose(correlations["ches_percentile"]["spearman"],
                        table["ches"].rank().corr(table["chosen_logp_change"].rank()), abs_tol=1e-12)
    assert "CHES percentile" in capsys.readouterr().out


def test_edit_distance_is_levenshtein():
    script = _script()
    assert script.edit_distance([1, 2, 3], [1, 2, 3]) == 0
    assert script.edit_distance([], [4, 5]) == 2
    assert script.edit_distance([1, 2, 3, 4], [2, 3, 5]) == 2  # delete 1, substitute 4 -> 5
    assert script.edit_distance([7, 8, 9], [9, 7, 8]) == 2
