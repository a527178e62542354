"""The library's seams: in-memory models through api.compare, gating and writing without the CLI, the scorer
interface with the cache around any scorer, options defined once, phase hooks, and light CLI imports."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from prefdiag import api
from prefdiag.cli import app

ROOT = Path(__file__).parent.parent
SAMPLE = ROOT / "sample_data"
runner = CliRunner()


def _without_provenance(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "provenance"}


def _load(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype="float32")


def test_in_memory_models_gate_and_write_like_the_cli_on_paths(tmp_path):
    """Done-when of issue 9: objects in, gated and written without the CLI, the CLI's table and summary out."""
    from transformers import AutoTokenizer

    ref, pol = str(SAMPLE / "models" / "reference"), str(SAMPLE / "models" / "policy")
    data = str(SAMPLE / "pairs.jsonl")
    cli_out = tmp_path / "cli"
    done = runner.invoke(app, ["compare", data, "-r", ref, "-p", pol, "-o", str(cli_out), "--no-cache", "-q",
                               "--device", "cpu", "--min", "ranking_accuracy=0.1"])  # fmt: skip
    assert done.exit_code == 0, done.output

    reference, policy = _load(ref), _load(pol)
    policy.train()  # a model in training: scored in eval mode, left in training mode
    grads = [p.requires_grad for p in policy.parameters()]
    options = api.RunOptions(device="cpu", cache=False)
    result = api.compare(data, reference, policy, options, tokenizer=AutoTokenizer.from_pretrained(ref))
    assert policy.training and all(m.training for m in policy.modules())
    assert [p.requires_grad for p in policy.parameters()] == grads
    assert not reference.training  # it came in eval mode
    from prefdiag import gate

    outcome = result.apply_gate([gate.parse_cli_rule("ranking_accuracy=0.1", "min")])  # as the CLI's --min
    assert outcome["passed"] and result.passed
    written = result.write(tmp_path / "lib")
    assert sorted(p.name for p in written) == sorted(p.name for p in cli_out.iterdir())

    cli_summary = json.loads((cli_out / "summary.json").read_text())
    lib_summary = json.loads((tmp_path / "lib" / "summary.json").read_text())
    assert _close(_without_provenance(lib_summary), _without_provenance(cli_summary)), _first_difference(
        lib_summary, cli_summary
    )
    cli_pairs = pd.read_parquet(cli_out / "pairs.parquet")
    lib_pairs = pd.read_parquet(tmp_path / "lib" / "pairs.parquet")
    pd.testing.assert_frame_equal(lib_pairs, cli_pairs, check_exact=False, atol=1e-6, rtol=0)
    assert lib_summary["provenance"]["policy"]["in_memory"] is True


def _first_difference(a, b, path="") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key != "provenance" and not _close(a.get(key), b.get(key)):
                return _first_difference(a.get(key), b.get(key), f"{path}.{key}")
    return f"{path}: {a!r} != {b!r}"


def _close(a, b) -> bool:
    """Nested equality with floats to 1e-6 (summaries hold lists and dicts pytest.approx does not walk)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a if k != "provenance")
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_close, a, b))
    if isinstance(a, float) and isinstance(b, (int, float)):
        return abs(a - b) <= 1e-6
    return a == b


@pytest.fixture(scope="module")
def lora_policy(model_dirs, tmp_path_factory):
    """A LoRA adapter directory on the llama reference and the PeftModel object it was saved from."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(_load(str(model_dirs["llama"])), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))  # fmt: skip
    adapter = tmp_path_factory.mktemp("lora") / "adapter"
    peft_model.save_pretrained(adapter)
    return adapter, peft_model


def test_a_peft_policy_in_memory_scores_like_its_adapter_directory(model_dirs, pairs_file, lora_policy):
    """The TRL case without a reference model: reference = the PEFT policy with its adapter disabled."""
    adapter, peft_model = lora_policy
    ref = str(model_dirs["llama"])
    options = api.RunOptions(device="cpu", dtype="float32", cache=False)
    on_paths = api.compare(str(pairs_file), ref, str(adapter), options)
    implicit = api.compare(str(pairs_file), None, peft_model, options)
    explicit = api.compare(str(pairs_file), api.AdapterDisabled(peft_model), peft_model, options)
    separate = api.compare(str(pairs_file), _load(ref), peft_model, options)
    columns = ["ref_chosen_logp", "ref_rejected_logp", "policy_chosen_logp", "policy_rejected_logp", "dpo_loss"]
    for result in (implicit, explicit, separate):
        np.testing.assert_allclose(result.pairs[columns], on_paths.pairs[columns], atol=1e-6, rtol=0)
    assert on_paths.pairs["reward_margin"].abs().max() > 1e-3  # the adapter does change the policy
    assert implicit.summary["provenance"]["reference"]["adapter_disabled"] is True


def test_an_in_memory_model_is_cached_by_its_weights(model_dirs, pairs_file, tmp_path):
    import torch

    model = _load(str(model_dirs["gpt2"]))
    options = api.RunOptions(device="cpu", cache_dir=str(tmp_path))
    first = api.audit(str(pairs_file), model, options, tokenizer=str(model_dirs["gpt2"]))
    again = api.audit(str(pairs_file), model, options, tokenizer=str(model_dirs["gpt2"]))
    assert first.summary["provenance"]["reference"]["pairs_from_cache"] == 0
    assert again.summary["provenance"]["reference"]["pairs_from_cache"] == 24
    np.testing.assert_array_equal(again.pairs["ref_chosen_logp"], first.pairs["ref_chosen_logp"])
    with torch.no_grad():
        next(model.parameters()).add_(0.5)  # other weights: another cache identity
    changed = api.audit(str(pairs_file), model, options, tokenizer=str(model_dirs["gpt2"]))
    assert changed.summary["provenance"]["reference"]["pairs_from_cache"] == 0
    never = api.RunOptions(device="cpu", cache_dir=str(tmp_path / "never"), hash_weights=False)
    api.audit(str(pairs_file), model, never, tokenizer=str(model_dirs["gpt2"]))
    assert not (tmp_path / "never").exists() or not any((tmp_path / "never").glob("*/shard-*"))


def test_an_in_memory_model_without_a_tokenizer_is_one_clear_error(pairs_file):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=400, n_embd=16, n_layer=1, n_head=2))  # built, not loaded
    from prefdiag.errors import ModelError

    with pytest.raises(ModelError, match="needs a tokenizer"):
        api.audit(str(pairs_file), model, api.RunOptions(device="cpu", cache=False))


class _MarginScorer:
    """A scorer of its own (the interface's second implementation): the engine's log-probs plus one extra column,
    the margin, counting the pairs it was asked to score."""

    def __init__(self, model) -> None:
        from prefdiag.scoring import LogProbScorer

        self.engine, self.extras, self.asked = LogProbScorer(model), {}, 0

    def score(self, tokenized, progress=None, pairs=None, on_pairs_done=None):
        def done(indices, chosen, rejected, extras):
            if on_pairs_done is not None:
                on_pairs_done(indices, chosen, rejected, {"margin": chosen - rejected})

        self.asked += len(pairs)
        chosen, rejected = self.engine.score(tokenized, progress, pairs, done)
        self.extras = {"margin": chosen - rejected}
        return chosen, rejected


def test_the_cache_wraps_any_scorer_and_serves_its_extras(model_dirs, pairs_file, tmp_path):
    from transformers import AutoTokenizer

    from prefdiag.cache import LogProbCache, pair_keys
    from prefdiag.scorers import CachedScorer
    from prefdiag.tokenization import tokenize_pairs

    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    tokenized = tokenize_pairs(AutoTokenizer.from_pretrained(model_dirs["qwen"]), *(
        [r[k] for r in rows] for k in ("prompt", "chosen", "rejected")))  # fmt: skip
    keys = pair_keys(tokenized.prompt_ids, tokenized.chosen_ids, tokenized.rejected_ids)
    inner = _MarginScorer(_load(str(model_dirs["qwen"])).eval())

    def cached(extras):
        return CachedScorer(inner, LogProbCache(tmp_path, "model", {"name": "qwen"}), keys, extras=extras)

    first = cached(("margin",))
    chosen, rejected = first.score(tokenized)
    assert inner.asked == 24 and first.pairs_from_cache == 0
    second = cached(("margin",))
    again = second.score(tokenized)
    assert inner.asked == 24 and second.pairs_from_cache == 24  # served from disk, the scorer not asked
    np.testing.assert_array_equal(again[0], chosen)
    np.testing.assert_array_equal(second.extras["margin"], chosen - rejected)
    third = cached(("margin", "not_yet_cached"))  # an extra the cache lacks: every pair is a miss
    third.score(tokenized)
    assert inner.asked == 48 and third.pairs_from_cache == 0


def test_options_are_defined_once_and_agree_with_the_engine():
    from prefdiag import data, models, options, scoring
    from prefdiag.cli import _options as o

    assert options.LAYOUTS == scoring.LAYOUTS
    assert options.DATA_FORMATS == tuple(data.DATA_FORMATS)
    assert options.DTYPES == ("auto", *models.DTYPES) and options.DEVICES == models.DEVICES
    assert [m.value for m in o.Layout] == list(options.LAYOUTS) and [m.value for m in o.Dtype] == list(options.DTYPES)
    text = runner.invoke(app, ["compare", "--help"], terminal_width=200).stdout
    assert str(options.BATCH_TOKENS["cuda"]) in text and str(options.BATCH_TOKENS["cpu"]) in text


@pytest.mark.parametrize("beta", ["inf", "nan", "-inf"])
def test_beta_must_be_finite(beta, pairs_file):
    done = runner.invoke(app, ["audit", str(pairs_file), "--beta", beta])
    assert done.exit_code == 2 and "--beta must be" in done.stderr, done.output


def test_help_and_gate_import_no_torch(tmp_path):
    run_dir = tmp_path / "run"
    done = runner.invoke(app, ["audit", str(SAMPLE / "pairs.jsonl"), "-q", "-o", str(run_dir)])
    assert done.exit_code == 0, done.output
    for args in (["--help"], ["compare", "--help"], ["gate", str(run_dir), "--min", "n_pairs=1", "-q"]):
        code = (
            "import sys\nfrom prefdiag.cli import main\nsys.argv = ['prefdiag', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit as exc:\n    code = exc.code\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nsys.exit(code)\n"
        )
        done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=tmp_path)
        assert done.returncode == 0, (args, done.stderr)


def test_the_benchmark_times_phases_through_the_library_hook(model_dirs, pairs_file, tmp_path):
    stats = tmp_path / "stats.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "prefdiag_timed.py"), "audit", str(pairs_file), "-r",
               str(model_dirs["gpt2"]), "--device", "cpu", "--no-cache", "-q", "-o", str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env={**__import__("os").environ,
                          "PREFDIAG_BENCH_STATS": str(stats)}, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    phases = json.loads(stats.read_text())["phases"]
    for name in ("cli_setup", "load_data", "load_tokenizer", "tokenize", "model_identity", "load_model", "score",
                 "diagnostics", "write_outputs", "print_report"):  # fmt: skip
        assert phases[name]["calls"] >= 1, name


def test_the_readme_library_example_runs_as_written(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"The library does the same without the CLI:\n\n```python\n(.*?)```", readme, re.S).group(1)
    import shutil

    shutil.copytree(SAMPLE, tmp_path / "sample_data")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    assert isinstance(namespace["result"].pairs, pd.DataFrame)
