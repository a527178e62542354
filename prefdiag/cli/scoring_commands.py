"""`prefdiag audit` and `prefdiag compare`: parse options, call prefdiag.api, show and write the result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefdiag.cli import _options as o
from prefdiag.cli._errors import handles_errors
from prefdiag.options import DEFAULT_BETA, DEFAULT_TOP, HIGH_CHES_SHARE


def _options(**kwargs: Any):
    from prefdiag.data import ColumnMap
    from prefdiag.options import RunOptions

    columns = ColumnMap(
        prompt=kwargs.pop("prompt_column"),
        chosen=kwargs.pop("chosen_column"),
        rejected=kwargs.pop("rejected_column"),
        id=kwargs.pop("id_column"),
    )
    kwargs["dtype"] = kwargs["dtype"].value
    kwargs["device"] = kwargs["device"].value
    kwargs["data_format"] = kwargs["data_format"].value
    kwargs["layout"] = kwargs["layout"].value
    if "compat" in kwargs:
        kwargs["compat"] = kwargs["compat"].value
    if kwargs.get("chat_template") is not None:
        kwargs["chat_template"] = str(kwargs["chat_template"])
    return RunOptions(columns=columns, **kwargs)


def _finish(
    result, plan, output: Path | None, fmt: o.OutputFormat, table_format: o.TableFormat, top: int, quiet: bool
) -> None:
    from prefdiag.cli._finish import finish

    finish(result, plan, output, fmt, table_format.value, top, quiet)


def _run(command: str, **values: Any) -> None:
    """What audit and compare share: check --output and read the rules and the baseline before any model loads,
    score, then gate, write and print. ``values`` are the command's parameters, by name."""
    from prefdiag import api
    from prefdiag.cli._finish import prepare
    from prefdiag.cli._output import ProgressBars, setup_logging
    from prefdiag.gate import run_mode
    from prefdiag.result import check_output_dir

    data, reference, policy = values.pop("data"), values.pop("reference"), values.pop("policy", None)
    output, fmt, table_format, top, quiet = (values.pop(k) for k in ("output", "fmt", "table_format", "top", "quiet"))
    gate_inputs = [values.pop(k) for k in ("min_rules", "max_rules", "gate_file", "baseline")]
    setup_logging(quiet)
    if output is not None:
        check_output_dir(output)  # before any model loads
    revision, alias = values.pop("revision"), values.pop("revision_alias")
    options = _options(reference_revision=revision or alias, cache=not values.pop("no_cache"), **values)
    plan = prepare(command, run_mode(command, reference is not None), *gate_inputs)
    with ProgressBars(quiet) as progress:
        if policy is None:
            result = api.audit(data, reference, options, progress)
        else:
            result = api.compare(data, reference, policy, options, progress)
    _finish(result, plan, output, fmt, table_format, top, quiet)


@handles_errors
def audit(
    data: o.Data,
    reference: o.OptionalReference = None,
    beta: o.Beta = DEFAULT_BETA,
    max_length: o.MaxLength = None,
    dtype: o.DtypeOpt = o.Dtype.auto,
    device: o.DeviceOpt = o.Device.auto,
    batch_tokens: o.BatchTokens = None,
    layout: o.LayoutOpt = o.Layout.prefix,
    shard: o.Shard = False,
    tp: o.Tp = 1,
    tokenizer: o.Tokenizer = None,
    revision: o.Revision = None,
    revision_alias: o.RevisionAlias = None,
    trust_remote_code: o.TrustRemoteCode = False,
    split: o.Split = None,
    prompt_column: o.PromptColumn = "prompt",
    chosen_column: o.ChosenColumn = "chosen",
    rejected_column: o.RejectedColumn = "rejected",
    id_column: o.IdColumn = None,
    data_format: o.DataFormatOpt = o.DataFormat.auto,
    binarize_seed: o.BinarizeSeed = 0,
    chat_template: o.ChatTemplate = None,
    compat: o.CompatOpt = o.Compat.trl1,
    max_prompt_length: o.MaxPromptLength = None,
    ches: o.Ches = True,
    high_ches_share: o.HighChesShare = HIGH_CHES_SHARE,
    group_by: o.GroupBy = None,
    output: o.Output = None,
    fmt: o.FormatOpt = o.OutputFormat.table,
    table_format: o.TableFormatOpt = o.TableFormat.parquet,
    top: o.Top = DEFAULT_TOP,
    min_rules: o.MinRules = None,
    max_rules: o.MaxRules = None,
    gate_file: o.GateFile = None,
    baseline: o.Baseline = None,
    no_cache: o.NoCache = False,
    cache_dir: o.CacheDir = None,
    quiet: o.Quiet = False,
) -> None:
    """Audit a preference dataset before any DPO training: data checks, and the reference model's view.

    Without --reference, runs the model-free checks only (identical, near-identical, duplicate and conflicting
    pairs, empty prompts or responses, extreme length ratios), fast enough for millions of pairs. With it, also
    scores every pair's chosen and rejected response under the reference (tokenized exactly as TRL's DPOTrainer
    does) and reports how often the reference already prefers the rejected answer: those pairs start DPO on the
    wrong side (Chen et al. 2024 found that few of them flip).

    Example: prefdiag audit sample_data/pairs.jsonl --reference sample_data/models/reference --output out/
    """
    _run("audit", **locals())


@handles_errors
def compare(
    data: o.Data,
    reference: o.Reference,
    policy: o.Policy,
    beta: o.Beta = DEFAULT_BETA,
    max_length: o.MaxLength = None,
    dtype: o.DtypeOpt = o.Dtype.auto,
    device: o.DeviceOpt = o.Device.auto,
    batch_tokens: o.BatchTokens = None,
    layout: o.LayoutOpt = o.Layout.prefix,
    shard: o.Shard = False,
    tp: o.Tp = 1,
    tokenizer: o.Tokenizer = None,
    revision: o.Revision = None,
    revision_alias: o.RevisionAlias = None,
    policy_revision: o.PolicyRevision = None,
    trust_remote_code: o.TrustRemoteCode = False,
    split: o.Split = None,
    prompt_column: o.PromptColumn = "prompt",
    chosen_column: o.ChosenColumn = "chosen",
    rejected_column: o.RejectedColumn = "rejected",
    id_column: o.IdColumn = None,
    data_format: o.DataFormatOpt = o.DataFormat.auto,
    binarize_seed: o.BinarizeSeed = 0,
    chat_template: o.ChatTemplate = None,
    compat: o.CompatOpt = o.Compat.trl1,
    max_prompt_length: o.MaxPromptLength = None,
    ches: o.Ches = True,
    high_ches_share: o.HighChesShare = HIGH_CHES_SHARE,
    group_by: o.GroupBy = None,
    output: o.Output = None,
    fmt: o.FormatOpt = o.OutputFormat.table,
    table_format: o.TableFormatOpt = o.TableFormat.parquet,
    top: o.Top = DEFAULT_TOP,
    min_rules: o.MinRules = None,
    max_rules: o.MaxRules = None,
    gate_file: o.GateFile = None,
    baseline: o.Baseline = None,
    no_cache: o.NoCache = False,
    cache_dir: o.CacheDir = None,
    quiet: o.Quiet = False,
) -> None:
    """Compare a DPO-trained policy with its reference on a preference dataset.

    Reports reward accuracy (what TRL logs) next to ranking accuracy (does the policy actually prefer the chosen
    answer?), the negative-margin regime, likelihood displacement and the pairs that show them.

    Example: prefdiag compare sample_data/pairs.jsonl -r sample_data/models/reference -p sample_data/models/policy
    """
    _run("compare", **locals())
