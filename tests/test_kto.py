"""Unpaired KTO rows (prompt, completion, label) scored per response: the same log-probs as the same responses
scored inside pairs, in every file format and layout; TRL's unpairing of paired data; the per-response metrics
against brute-force definitions; the data checks; the reports, the gate and the bad input a user can give."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_conversations, make_pairs
from test_data_formats import write
from typer.testing import CliRunner

from prefdiag import api
from prefdiag.cli import app
from prefdiag.data import ColumnMap, load_pairs
from prefdiag.options import RunOptions

runner = CliRunner()


def kto_rows(pairs: list[dict]) -> list[dict]:
    """Each pair as TRL's unpair_preference_dataset writes it: its chosen (label true), then its rejected (false)."""
    rows = []
    for i, pair in enumerate(pairs):
        for side, label in (("chosen", True), ("rejected", False)):
            rows.append({"id": f"{i}/{side}", "prompt": pair["prompt"], "completion": pair[side], "label": label,
                         "source": f"s{i % 3}"})  # fmt: skip
    return rows


def options(**kwargs) -> RunOptions:
    return RunOptions(device="cpu", cache=False, **kwargs)


@pytest.fixture(scope="module")
def pairs() -> list[dict]:
    return make_pairs(12)


@pytest.fixture(scope="module")
def pair_run(pairs, tmp_path_factory, model_dirs):
    path = write(pairs, tmp_path_factory.mktemp("pairs") / "pairs", "jsonl")
    return api.compare(str(path), str(model_dirs["llama"]), str(model_dirs["llama-policy"]), options())


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "saved"])
def test_kto_rows_get_the_log_probs_of_the_same_responses_scored_in_pairs(fmt, pairs, pair_run, model_dirs, tmp_path):
    path = write(kto_rows(pairs), tmp_path / "kto", fmt)
    run = api.compare(str(path), str(model_dirs["llama"]), str(model_dirs["llama-policy"]), options())
    table = run.pairs
    assert run.summary["data_shape"] == "kto" and run.summary["n_responses"] == 2 * len(pairs)
    assert list(table["response_id"]) == [r["id"] for r in kto_rows(pairs)]
    assert table["label"].dtype == bool and list(table["label"]) == [True, False] * len(pairs)
    for model in ("ref", "policy"):
        interleaved = np.ravel(np.column_stack([pair_run.pairs[f"{model}_chosen_logp"],
                                                pair_run.pairs[f"{model}_rejected_logp"]]))  # fmt: skip
        np.testing.assert_allclose(table[f"{model}_logp"], interleaved, rtol=1e-6, atol=1e-5)  # fp32 batches
    tokens = np.ravel(np.column_stack([pair_run.pairs["chosen_tokens"], pair_run.pairs["rejected_tokens"]]))
    assert list(table["completion_tokens"]) == list(tokens)
    assert not any(c in table.columns for c in ("ref_margin", "dpo_loss", "reward_margin", "ches"))  # no pair metrics


@pytest.mark.parametrize("layout", ["separate", "packed"])
def test_every_layout_gives_the_same_response_log_probs(layout, pairs, model_dirs, tmp_path):
    path = write(kto_rows(pairs), tmp_path / "kto", "jsonl")
    prefix = api.audit(str(path), str(model_dirs["qwen"]), options())
    other = api.audit(str(path), str(model_dirs["qwen"]), options(layout=layout))
    np.testing.assert_allclose(other.pairs["ref_logp"], prefix.pairs["ref_logp"], rtol=0, atol=1e-5)


def test_a_response_is_scored_once_not_as_two_sides_of_a_pair(pairs, model_dirs, tmp_path):
    """A tie (chosen = rejected token ids, as every unpaired row is) lays the completion out once."""
    from prefdiag.rows import build_rows
    from prefdiag.tokenization import tokenize_pairs
    from prefdiag.models import load_tokenizer

    tokenizer = load_tokenizer(str(model_dirs["llama"]))
    tied = tokenize_pairs(tokenizer, ["Q: one?"], [" yes"], [" yes"])
    different = tokenize_pairs(tokenizer, ["Q: one?"], [" yes"], [" no"])
    for layout in ("prefix", "separate"):
        [row] = build_rows(tied, layout)  # separate: one row, not two
        assert len(row.input_ids) == len(tied.prompt_ids[0]) + len(tied.chosen_ids[0])
        assert sum(len(r.input_ids) for r in build_rows(different, layout)) > len(row.input_ids)


def test_paired_data_read_as_kto_is_unpaired_as_trl_does(pairs, pair_run, model_dirs, tmp_path):
    path = write(pairs, tmp_path / "pairs", "jsonl")
    data = load_pairs(str(path), data_format="kto")
    first, second = pairs[0]["id"], pairs[1]["id"]
    assert list(data.table["pair_id"][:4]) == [f"{first}/chosen", f"{first}/rejected", f"{second}/chosen",
                                               f"{second}/rejected"]  # fmt: skip
    assert list(data.input_rows()[:4]) == [0, 0, 1, 1]
    run = api.audit(str(path), str(model_dirs["llama"]), options(data_format="kto"))
    from_file = api.audit(str(write(kto_rows(pairs), tmp_path / "kto", "jsonl")), str(model_dirs["llama"]), options())
    np.testing.assert_allclose(run.pairs["ref_logp"], from_file.pairs["ref_logp"], rtol=0, atol=1e-9)
    assert run.summary["provenance"]["dataset"]["unpaired_from_pairs"] == len(pairs)


def test_conversational_kto_rows_match_the_pair_form(model_dirs, tmp_path):
    conversations = make_conversations(6)
    pair_path = write(conversations, tmp_path / "chat", "jsonl")
    pair_run = api.audit(str(pair_path), str(model_dirs["qwen"]), options())
    run = api.audit(str(write(kto_rows(conversations), tmp_path / "kto", "jsonl")), str(model_dirs["qwen"]),
                    options())  # fmt: skip
    expected = np.ravel(np.column_stack([pair_run.pairs["ref_chosen_logp"], pair_run.pairs["ref_rejected_logp"]]))
    np.testing.assert_allclose(run.pairs["ref_logp"], expected, rtol=1e-6, atol=1e-5)


def brute_auc(values: np.ndarray, labels: np.ndarray) -> float:
    pairs = list(itertools.product(values[labels], values[~labels]))
    return sum(1.0 if d > u else 0.5 if d == u else 0.0 for d, u in pairs) / len(pairs)


def test_the_summary_follows_its_definitions(pairs, model_dirs, tmp_path):
    rows = [row for i, row in enumerate(kto_rows(pairs)) if row["label"] or i < 12]  # 12 desirable, 6 undesirable
    path = write(rows, tmp_path / "kto", "jsonl")
    run = api.compare(str(path), str(model_dirs["llama"]), str(model_dirs["llama-policy"]), options(beta=0.25))
    t, s = run.pairs, run.summary
    label = t["label"].to_numpy()
    per_token = t["ref_logp"] / t["completion_tokens"]
    np.testing.assert_allclose(t["ref_logp_per_token"], per_token)
    np.testing.assert_allclose(t["reward"], 0.25 * (t["policy_logp"] - t["ref_logp"]))
    point = np.median(per_token)
    assert s["ref_logp_per_token_median"] == pytest.approx(point)
    assert list(t["ref_favoured"]) == list(per_token > point)
    assert s["ref_favoured_desirable_rate"] == pytest.approx((per_token[label] > point).mean())
    assert s["ref_favoured_undesirable_rate"] == pytest.approx((per_token[~label] > point).mean())
    assert s["ref_desirable_auc"] == pytest.approx(brute_auc(per_token.to_numpy(), label))
    assert s["policy_desirable_auc"] == pytest.approx(brute_auc(t["policy_logp_per_token"].to_numpy(), label))
    # TRL's KTO logs: rewards/chosen and rewards/rejected are the means of beta x log-ratio per label.
    assert s["mean_reward_desirable"] == pytest.approx(t.loc[label, "reward"].mean())
    assert s["mean_reward_undesirable"] == pytest.approx(t.loc[~label, "reward"].mean())
    assert s["mean_reward_gap"] == pytest.approx(s["mean_reward_desirable"] - s["mean_reward_undesirable"])
    assert s["mean_logps_desirable"] == pytest.approx(t.loc[label, "policy_logp"].mean())
    displaced = label & (t["policy_logp"] < t["ref_logp"]).to_numpy()
    assert list(t["desirable_displaced"]) == list(displaced)
    assert s["desirable_displaced_rate"] == pytest.approx(displaced.sum() / label.sum())
    by_prompt = t.assign(pt=per_token).groupby(["prompt", "label"])["pt"].mean().unstack().dropna()
    assert s["n_prompts_both_labels"] == len(by_prompt) == 6
    assert s["ref_prompt_accuracy"] == pytest.approx((by_prompt[True] > by_prompt[False]).mean())
    # KTO's balance, desirable_weight x n_D / (undesirable_weight x n_U) in [1, 4/3], with undesirable_weight 1:
    assert (s["desirable_weight_min"], s["desirable_weight_max"]) == pytest.approx((0.5, 4 / 3 * 0.5))
    finding = next(f for f in s["verdict"]["findings"] if f["id"] == "kto_weights")
    assert finding["level"] == "warn" and "between 0.5 and 0.6667" in finding["text"]  # 12:6 is outside [1, 4/3]


def test_data_checks_flag_duplicates_conflicting_labels_and_empty_completions(tmp_path):
    rows = [
        {"prompt": "Q: sky?", "completion": " blue", "label": True},
        {"prompt": "Q: sky?", "completion": " blue", "label": True},  # a duplicate
        {"prompt": "Q: sky?", "completion": "  blue ", "label": False},  # same text (whitespace): conflicting label
        {"prompt": "Q: sea?", "completion": " wet", "label": True},
        {"prompt": "Q: sea?", "completion": "   ", "label": False},  # empty
        {"prompt": "Q: sun?", "completion": " hot", "label": "false"},
    ]
    run = api.audit(str(write(rows, tmp_path / "kto", "jsonl")), None, options())
    t = run.pairs
    assert list(t["duplicate"]) == [True, True, False, False, False, False]
    assert list(t["conflicting_label"]) == [True, True, True, False, False, False]
    assert list(t["empty_response"]) == [False, False, False, False, True, False]
    assert run.summary["n_conflicting_label"] == 3 and "ref_logp" not in t.columns
    ids = {f["id"]: f for f in run.summary["verdict"]["findings"]}
    assert ids["conflicting_label"]["pairs"] == ["0", "1", "2"] and ids["conflicting_label"]["level"] == "warn"


@pytest.mark.parametrize("value, ok", [(True, True), ("TRUE", True), (1, True), ("0", True), ("maybe", False),
                                       (None, False), (2, False)])  # fmt: skip
def test_labels_are_booleans_or_a_clear_error_naming_the_row(value, ok, tmp_path):
    rows = [{"prompt": "Q?", "completion": " a", "label": True}, {"prompt": "Q?", "completion": " b", "label": value}]
    path = write(rows, tmp_path / "kto", "jsonl")
    result = runner.invoke(app, ["audit", str(path), "--data-format", "kto", "-q"])
    if ok:
        assert result.exit_code == 0, result.output
        return
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert "\n" not in line and "row 2, column 'label'" in line and "Traceback" not in result.output


def test_kto_rows_without_a_prompt_are_refused(tmp_path):
    path = write([{"completion": " a", "label": True}, {"completion": " b", "label": False}], tmp_path / "k", "jsonl")
    result = runner.invoke(app, ["audit", str(path), "--data-format", "kto"])
    assert result.exit_code == 2 and "need a 'prompt' column" in result.stderr


def test_cli_writes_the_responses_table_and_reports_and_gates_them(pairs, model_dirs, tmp_path):
    rows = kto_rows(pairs)
    rows[0]["completion"] = " <script>alert(1)</script> | *bold*"
    path = write(rows, tmp_path / "kto", "jsonl")
    out = tmp_path / "out"
    result = runner.invoke(app, ["compare", str(path), "-r", str(model_dirs["llama"]), "-p",
                                 str(model_dirs["llama-policy"]), "-o", str(out), "--no-cache",
                                 "--group-by", "source"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "responses" in result.output and "desirable responses made less likely" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["junit.xml", "report.html", "report.md", "responses.parquet",
                                                     "summary.json"]  # fmt: skip
    table = pd.read_parquet(out / "responses.parquet")
    assert table["response_id"].tolist() == [r["id"] for r in rows]
    from prefdiag.schemas import response_columns

    published = response_columns()
    assert set(published) <= set(table.columns)  # a compare run has every column prefdiag computes
    for column, kind in published.items():
        dtype = str(table[column].dtype)
        assert dtype in ("str", "string", "object") if kind == "string" else dtype == kind, column
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["groups"]["values"]) == {"s0", "s1", "s2"}
    assert sum(g["n_responses"] for g in summary["groups"]["values"].values()) == len(rows)
    html = (out / "report.html").read_text()
    assert "<script>alert" not in html and "Worst responses" in html and "Reference log-prob per token" in html
    markdown = (out / "report.md").read_text()
    assert "<script>" not in markdown and "| response |" in markdown
    auc = summary["ref_desirable_auc"]
    failing = runner.invoke(app, ["gate", str(out), "--min", f"ref_desirable_auc={auc + 0.01}"])
    assert failing.exit_code == 1, failing.output
    passing = runner.invoke(app, ["gate", str(out), "--min", f"ref_desirable_auc={auc - 0.01}",
                                  "--max", "conflicting_label_rate=0"])  # fmt: skip
    assert passing.exit_code == 0, passing.output
    assert api.RunResult.load(out).pairs["response_id"].tolist() == table["response_id"].tolist()


def test_a_warm_cache_gives_the_same_numbers_without_loading_a_model(pairs, model_dirs, tmp_path):
    path = write(kto_rows(pairs), tmp_path / "kto", "jsonl")
    cached = RunOptions(device="cpu", cache_dir=str(tmp_path / "cache"))
    first = api.audit(str(path), str(model_dirs["gpt2"]), cached)
    again = api.audit(str(path), str(model_dirs["gpt2"]), cached)
    assert again.summary["provenance"]["reference"]["pairs_from_cache"] == len(first.pairs)
    pd.testing.assert_series_equal(first.pairs["ref_logp"], again.pairs["ref_logp"])


def test_a_kto_baseline_compares_metrics_and_a_pairs_baseline_is_refused(pairs, model_dirs, tmp_path):
    path = write(kto_rows(pairs), tmp_path / "kto", "jsonl")
    before, pair_run = tmp_path / "before", tmp_path / "pairs"
    ref, policy = str(model_dirs["gpt2"]), str(model_dirs["gpt2-policy"])
    assert runner.invoke(app, ["compare", str(path), "-r", ref, "-p", ref, "-o", str(before), "-q"]).exit_code == 0
    result = runner.invoke(app, ["compare", str(path), "-r", ref, "-p", policy, "--baseline", str(before), "-o",
                                 str(tmp_path / "after"), "--max", "reward_auc_drop=1", "-q"])  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "after" / "summary.json").read_text())
    delta = summary["baseline"]["metrics"]["reward_auc"]
    assert delta["baseline"] == 0.5 and delta["current"] == summary["reward_auc"]  # the baseline: policy = reference
    assert "Unpaired responses: the metrics are compared" in (tmp_path / "after" / "report.md").read_text()
    pairs_path = write(pairs, tmp_path / "pairs", "jsonl")
    assert runner.invoke(app, ["audit", str(pairs_path), "-r", ref, "-o", str(pair_run), "-q"]).exit_code == 0
    refused = runner.invoke(app, ["audit", str(path), "-r", ref, "--baseline", str(pair_run), "-q"])
    assert refused.exit_code == 2 and "the baseline ran on preference pairs" in refused.stderr



PLANTED = [  # (row, expected removal rules)
    {"id": "a", "prompt": "Q: sky?", "completion": " blue", "label": True},
    {"id": "b", "prompt": "Q: sky?", "completion": " blue", "label": True},  # a later copy of a: duplicate
    {"id": "c", "prompt": "Q: sea?", "completion": " wet", "label": True},
    {"id": "d", "prompt": "Q: sea?", "completion": " wet ", "label": False},  # c's text labelled both ways
    {"id": "e", "prompt": "Q: sun?", "completion": "  ", "label": False},  # empty
    {"id": "f", "prompt": "Q: sun?", "completion": " hot", "label": True, "note": "kept"},
]
REMOVED = {"b": ["duplicate"], "c": ["conflicting_label"], "d": ["conflicting_label"], "e": ["empty_response"]}


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "saved"])
def test_clean_removes_exactly_the_planted_kto_rows_and_is_idempotent(fmt, tmp_path):
    source = write(PLANTED, tmp_path / "kto", fmt)
    output = tmp_path / ("clean" + ("" if fmt == "saved" else source.suffix))
    result = runner.invoke(app, ["clean", str(source), "-o", str(output)])
    assert result.exit_code == 0, result.output
    assert "removed 4 of 6 responses" in result.output
    manifest = json.loads(Path(f"{output}.manifest.json").read_text())
    assert {r["response_id"]: r["rules"] for r in manifest["removed"]} == REMOVED and manifest["n_responses"] == 6
    kept = load_pairs(str(output)).table
    assert kept["pair_id"].tolist() == ["a", "f"] and kept["label"].tolist() == [True, True]
    again = tmp_path / ("again" + ("" if fmt == "saved" else source.suffix))
    assert "removed 0 of 2 responses" in runner.invoke(app, ["clean", str(output), "-o", str(again)]).output


def test_clean_takes_a_policy_flag_from_a_saved_kto_run(pairs, model_dirs, tmp_path):
    source = write(kto_rows(pairs), tmp_path / "kto", "jsonl")
    out = tmp_path / "run"
    run = runner.invoke(app, ["compare", str(source), "-r", str(model_dirs["llama"]), "-p",
                              str(model_dirs["llama-policy"]), "-o", str(out), "-q", "--no-cache"])  # fmt: skip
    assert run.exit_code == 0, run.output
    displaced = pd.read_parquet(out / "responses.parquet").query("desirable_displaced")["response_id"].tolist()
    assert displaced  # the tiny policy lowers some desirable responses
    output = tmp_path / "clean.jsonl"
    result = runner.invoke(app, ["clean", str(source), "-o", str(output), "--from", str(out), "--rule",
                                 "desirable_displaced"])  # fmt: skip
    assert result.exit_code == 0, result.output
    kept = [json.loads(line)["id"] for line in output.read_text().splitlines()]
    assert kept == [r["id"] for r in kto_rows(pairs) if r["id"] not in displaced]


def test_clean_refuses_a_saved_kto_run_whose_labels_are_not_the_data_s(pairs, tmp_path):
    rows = kto_rows(pairs[:4])
    out = tmp_path / "run"
    run = runner.invoke(app, ["audit", str(write(rows, tmp_path / "kto", "jsonl")), "-o", str(out), "-q"])
    assert run.exit_code == 0, run.output
    rows[5]["label"] = not rows[5]["label"]  # the same ids and text, one label flipped
    output = tmp_path / "clean.jsonl"
    result = runner.invoke(app, ["clean", str(write(rows, tmp_path / "flipped", "jsonl")), "-o", str(output),
                                 "--from", str(out)])  # fmt: skip
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    message = (f"--from {out}: 1 of 8 responses in responses.parquet differ from the data in this run (first: "
               "response '2/rejected', column 'label')")  # fmt: skip
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not output.exists()


def test_clean_refuses_paired_data_read_as_kto(pairs, tmp_path):
    source = write(pairs, tmp_path / "pairs", "jsonl")
    result = runner.invoke(app, ["clean", str(source), "-o", str(tmp_path / "c.jsonl"), "--data-format", "kto"])
    assert result.exit_code == 2 and "clean it as pairs" in result.stderr and not (tmp_path / "c.jsonl").exists()


def test_every_finding_quotes_only_numbers_of_the_summary(pairs, model_dirs, tmp_path):
    """As for pairs (tests/test_verdict.py): each number a sentence quotes is one of its ``numbers``, formatted as
    the reports format that key, and equal to the summary's value."""
    import re

    from prefdiag import flags
    from prefdiag.formatting import format_value

    rows = kto_rows(pairs)
    path = write(rows + PLANTED, tmp_path / "kto", "jsonl")
    lopsided = write([r for r in rows if r["label"]][:5] + rows[1:2], tmp_path / "lopsided", "jsonl")
    runs = [api.audit(str(path), None, options()), api.audit(str(path), str(model_dirs["gpt2"]), options()),
            api.compare(str(path), str(model_dirs["gpt2"]), str(model_dirs["gpt2-policy"]), options()),
            api.compare(str(lopsided), str(model_dirs["gpt2"]), str(model_dirs["gpt2"]), options())]  # fmt: skip
    seen = set()
    for run in runs:
        for f in run.summary["verdict"]["findings"]:
            seen.add(f["id"])
            text = f["text"]
            for label in flags.RESPONSE_LABELS.values():
                text = text.replace(label, "")
            quoted = re.findall(r"-?\d+(?:\.\d+)?%?", text)
            allowed = {format_value(key, value) for key, value in f["numbers"].items()}
            assert all(run.summary[key] == value for key, value in f["numbers"].items()), f["id"]
            assert set(quoted) <= allowed, (f["id"], quoted, allowed)
    assert {"ref_favours_undesirable", "desirable_displaced", "policy_unchanged", "kto_weights", "duplicate",
            "conflicting_label", "empty_response"} <= seen  # fmt: skip


def test_progress_bars_count_responses_and_two_argument_factories_still_work(pairs, model_dirs, tmp_path):
    path = write(kto_rows(pairs)[:4], tmp_path / "kto", "jsonl")
    units, kinds = [], []

    def bars(kind, total, unit="pairs"):
        units.append(unit)
        return lambda n: None

    def plain(kind, total):  # a library user's factory from before units existed
        kinds.append(kind)
        return lambda n: None

    api.audit(str(path), str(model_dirs["gpt2"]), options(), bars)
    api.audit(str(path), str(model_dirs["gpt2"]), options(), plain)
    assert units and set(units) == {"responses"} and kinds == ["tokenizing", "scoring reference"]


def test_dropped_non_finite_and_empty_rows_are_left_out_of_every_number(pairs, model_dirs, tmp_path):
    """--max-length drops the rows whose prompt fills it: they are counted and named, and no rate, median, AUC or
    mean includes them (checked against the same numbers computed on the kept rows alone)."""
    rows = kto_rows(pairs)
    rows[0]["prompt"] = rows[1]["prompt"] = " ".join(["the cat"] * 40)  # pair 0: a prompt over --max-length
    path = write(rows, tmp_path / "kto", "jsonl")
    run = api.compare(str(path), str(model_dirs["gpt2"]), str(model_dirs["gpt2-policy"]), options(max_length=48))
    t, s = run.pairs, run.summary
    assert t["dropped"].tolist()[:2] == [True, True] and t["dropped"].sum() == 2 and s["n_scored"] == len(rows) - 2
    assert np.isnan(t.loc[0, "ref_logp"]) and not t.loc[0, "ref_favoured"] and not t.loc[0, "desirable_displaced"]
    kept = t[~t["dropped"]]
    label = kept["label"].to_numpy()
    assert s["ref_logp_per_token_median"] == pytest.approx(np.median(kept["ref_logp_per_token"]))
    assert s["ref_desirable_auc"] == pytest.approx(brute_auc(kept["ref_logp_per_token"].to_numpy(), label))
    assert s["reward_auc"] == pytest.approx(brute_auc(kept["reward"].to_numpy(), label))
    assert s["undesirable_raised_rate"] == pytest.approx((kept["logratio"][~label] > 0).mean())
    assert s["mean_reward_undesirable"] == pytest.approx(kept.loc[~label, "reward"].mean())
    assert (s["desirable_weight_min"], s["desirable_weight_max"]) == pytest.approx((1.0, 4 / 3))  # kept: 11 and 11
    dropped = next(f for f in s["verdict"]["findings"] if f["id"] == "dropped")
    assert dropped["level"] == "warn" and dropped["pairs"] == ["0/chosen", "0/rejected"]
    everything = api.audit(str(path), str(model_dirs["gpt2"]), options(max_length=4))  # every prompt fills it
    assert everything.summary["n_scored"] == 0 and everything.summary["verdict"]["level"] == "warn"
    assert everything.summary["verdict"]["findings"][0]["id"] == "dropped"


def test_a_one_label_compare_still_reports_what_the_policy_did(pairs, model_dirs, tmp_path):
    path = write([r for r in kto_rows(pairs) if r["label"]], tmp_path / "kto", "jsonl")
    run = api.compare(str(path), str(model_dirs["gpt2"]), str(model_dirs["gpt2-policy"]), options())
    found = {f["id"]: f for f in run.summary["verdict"]["findings"]}
    assert {"desirable_displaced", "one_label"} <= set(found)
    assert "n/a" not in " ".join(f["text"] for f in found.values())


def test_group_by_takes_the_names_of_the_responses_table_before_any_model_loads(pairs, model_dirs, tmp_path):
    path = write(kto_rows(pairs), tmp_path / "kto", "jsonl")
    for column, expected in (("label", {"True", "False"}), ("completion", None), ("response_id", None)):
        run = api.audit(str(path), str(model_dirs["gpt2"]), options(group_by=column))
        values = run.summary["groups"]["values"]
        assert sum(v["n_responses"] for v in values.values()) == 2 * len(pairs), column
        if expected:
            assert set(values) == expected
            assert values["True"]["n_desirable"] == len(pairs) and values["False"]["n_desirable"] == 0
    result = runner.invoke(app, ["audit", str(path), "-r", "no/such/model", "--group-by", "rejected"])
    assert result.exit_code == 2 and "no column 'rejected'" in result.stderr and "completion" in result.stderr


def test_a_data_column_named_like_an_output_column_is_kept_renamed(pairs, model_dirs, tmp_path):
    rows = [{**r, "reward": 1.5, "truncated": "no"} for r in kto_rows(pairs)[:6]]
    run = api.compare(str(write(rows, tmp_path / "kto", "jsonl")), str(model_dirs["gpt2"]),
                      str(model_dirs["gpt2-policy"]), options(group_by="reward"))  # fmt: skip
    t = run.pairs
    assert t["data_reward"].tolist() == [1.5] * 6 and t["data_truncated"].tolist() == ["no"] * 6
    assert t["reward"].dtype == float and t["truncated"].dtype == bool
    assert list(run.summary["groups"]["values"]) == ["1.5"]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_labels_written_as_floats_or_text_by_other_tools_load(fmt, tmp_path):
    frame = pd.DataFrame({"prompt": ["Q?", "Q?", "R?"], "completion": [" a", " b", " c"], "label": [1.0, 0.0, 1.0]})
    path = tmp_path / f"kto.{fmt}"
    frame.to_csv(path, index=False) if fmt == "csv" else frame.to_parquet(path)  # CSV holds "1.0" and "0.0"
    data = load_pairs(str(path), data_format="kto")
    assert data.table["label"].tolist() == [True, False, True]


def test_column_options_name_the_kto_prompt_and_the_id(tmp_path):
    rows = [{"question": "Q?", "completion": " a", "label": True, "uid": "u1", "id": 7},
            {"question": "R?", "completion": " b", "label": False, "uid": "u2", "id": 8}]  # fmt: skip
    path = write(rows, tmp_path / "kto", "jsonl")
    data = load_pairs(str(path), data_format="kto", columns=ColumnMap(prompt="question", id="uid"))
    assert data.table["prompt"].tolist() == ["Q?", "R?"] and data.table["pair_id"].tolist() == ["u1", "u2"]
    assert data.table["id"].tolist() == [7, 8]  # the row's own id column, kept as a column
    missing = runner.invoke(app, ["audit", str(path), "--data-format", "kto"])
    assert missing.exit_code == 2 and "'prompt' column" in missing.stderr and "--prompt-column" in missing.stderr
    rows[1]["completion"] = 5
    bad = runner.invoke(app, ["audit", str(write(rows, tmp_path / "bad", "jsonl")), "--prompt-column", "question"])
    assert bad.exit_code == 2 and "'completion'" in bad.stderr and "'chosen'" not in bad.stderr
