"""`prefdiag clean`: parse options, call prefdiag.clean, print one line about what was removed."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from prefdiag.cli import _options as o
from prefdiag.cli._errors import handles_errors
from prefdiag.cli.scoring_commands import _options
from prefdiag.options import DEFAULT_BETA, RunOptions

CleanOutput = Annotated[
    str,
    typer.Option("--output", "-o", help="The cleaned dataset, in the input's format (a file, or a save_to_disk "
                 "directory); its manifest is written beside it as OUTPUT.manifest.json.", show_default=False),
]  # fmt: skip
Rule = Annotated[
    Optional[list[str]],
    typer.Option("--rule", help="Remove the pairs this boolean flag marks (repeat for several). Default: identical, "
                 "empty_response, empty_prompt, boundary_mismatch (with a tokenizer), duplicate (all copies but the "
                 "first) and conflict. Any flag of the per-pair table: reversed_pair, likely_mislabeled, high_ches..."),
]  # fmt: skip
FromRun = Annotated[
    Optional[str],
    typer.Option("--from", help="A saved run's --output directory: take the flags from its pairs.parquet (joined by "
                 "pair_id; responses.parquet by response_id for KTO rows) instead of computing them; refused when "
                 "the text it saved is not this data's."),
]  # fmt: skip


@handles_errors
def clean(
    data: o.Data,
    output: CleanOutput,
    rule: Rule = None,
    from_run: FromRun = None,
    reference: o.OptionalReference = None,
    policy: o.OptionalPolicy = None,
    beta: o.Beta = DEFAULT_BETA,
    max_length: o.MaxLength = None,
    dtype: o.DtypeOpt = o.Dtype.auto,
    device: o.DeviceOpt = o.Device.auto,
    tokenizer: o.Tokenizer = None,
    revision: o.Revision = None,
    trust_remote_code: o.TrustRemoteCode = False,
    split: o.Split = None,
    prompt_column: o.PromptColumn = "prompt",
    chosen_column: o.ChosenColumn = "chosen",
    rejected_column: o.RejectedColumn = "rejected",
    id_column: o.IdColumn = None,
    data_format: o.DataFormatOpt = o.DataFormat.auto,
    binarize_seed: o.OptionalBinarizeSeed = None,
    chat_template: o.ChatTemplate = None,
    compat: o.CompatOpt = o.Compat(RunOptions.compat),
    max_prompt_length: o.MaxPromptLength = None,
    no_cache: o.NoCache = False,
    cache_dir: o.CacheDir = None,
    quiet: o.Quiet = False,
) -> None:
    """Write the dataset back without its broken pairs, ready for DPOTrainer.

    Keeps the input's format, columns and row order; removes the pairs the rules flag (by default identical,
    empty, duplicated beyond one copy and conflicting pairs, and boundary mismatches when a tokenizer ran) and
    writes a manifest of what was removed and why. With --from, the flags come from a saved run; with
    --reference (and --policy), from scoring here.

    Example: prefdiag clean pairs.jsonl --output clean.jsonl --rule likely_mislabeled --from out/
    """
    from prefdiag.clean import clean as clean_data
    from prefdiag.saved_flags import recorded_binarize_seed
    from prefdiag.cli._output import ProgressBars, setup_logging

    setup_logging(quiet)
    if binarize_seed is None and from_run is not None:
        binarize_seed = recorded_binarize_seed(from_run)  # the run's pairs, which its flags are about
    seed = {} if binarize_seed is None else {"binarize_seed": binarize_seed}  # else RunOptions' default
    options = _options(
        beta=beta, max_length=max_length, dtype=dtype, device=device, batch_tokens=None, layout=o.Layout.prefix,
        shard=False, tokenizer=tokenizer, reference_revision=revision, trust_remote_code=trust_remote_code,
        split=split, prompt_column=prompt_column, chosen_column=chosen_column, rejected_column=rejected_column,
        id_column=id_column, cache=not no_cache, cache_dir=cache_dir, data_format=data_format, group_by=None,
        chat_template=chat_template, compat=compat, max_prompt_length=max_prompt_length, **seed,
    )  # fmt: skip
    rules = tuple(rule) if rule else None
    with ProgressBars(quiet) as progress:
        result = clean_data(data, output, rules=rules, from_run=from_run, reference=reference, policy=policy,
                            options=options, progress=progress)  # fmt: skip
    counts: dict[str, int] = {}
    for names in result.removed.values():
        for name in names:
            counts[name] = counts.get(name, 0) + 1
    by_rule = ", ".join(f"{n} {name}" for name, n in counts.items()) or "none flagged"
    skipped = f"; skipped: {', '.join(result.skipped_rules)}" if result.skipped_rules and rules is None else ""
    print(f"removed {result.n_removed} of {result.n_pairs} {result.unit}s ({by_rule}){skipped}; wrote {result.output} "
          f"and {result.manifest}")  # fmt: skip
