"""Options shared by several commands, as reusable Annotated aliases."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from prefdiag import options


def _choices(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A str Enum of an option's choices as prefdiag.options defines them (typer shows them in --help)."""
    return Enum(name, {value: value for value in values}, type=str)


OutputFormat = _choices("OutputFormat", options.OUTPUT_FORMATS)
TableFormat = _choices("TableFormat", options.TABLE_FORMATS)
DataFormat = _choices("DataFormat", options.DATA_FORMATS)
Dtype = _choices("Dtype", options.DTYPES)
Layout = _choices("Layout", options.LAYOUTS)
Device = _choices("Device", options.DEVICES)
Compat = _choices("Compat", options.COMPAT)


Data = Annotated[
    str,
    typer.Argument(
        metavar="DATA", show_default=False,
        help="Preference pairs: a .jsonl/.json/.csv/.parquet file, a save_to_disk directory, or a hub dataset id.",
    ),  # fmt: skip
]
Reference = Annotated[str, typer.Option("--reference", "-r", help="Reference model: a directory or hub id.")]
OptionalReference = Annotated[
    Optional[str], typer.Option("--reference", "-r", help="Reference model: a directory or hub id.")
]
Policy = Annotated[str, typer.Option("--policy", "-p", help="DPO-trained policy: a directory or hub id.")]
OptionalPolicy = Annotated[Optional[str], typer.Option("--policy", "-p", help="DPO-trained policy, for its flags.")]
Beta = Annotated[float, typer.Option(help="The beta the policy was trained with (> 0).")]
DtypeOpt = Annotated[Dtype, typer.Option("--dtype", help="Model dtype; auto is bfloat16 on a GPU, float32 on CPU.")]
DeviceOpt = Annotated[Device, typer.Option("--device", help="Where to run the models.")]
Shard = Annotated[
    bool,
    typer.Option(
        "--shard", metavar="",
        help="Spread each model's layers over every visible GPU (transformers' device_map='auto'), for models "
        "larger than one GPU.",
    ),
]
MaxLength = Annotated[
    Optional[int],
    typer.Option(help="Truncate prompt+response at this many tokens, keep_start, as TRL's max_length does."),
]
BatchTokens = Annotated[
    Optional[int], typer.Option(help=f"Padded tokens per forward pass ({options.batch_tokens_help()}).")
]
LayoutOpt = Annotated[
    Layout,
    typer.Option(
        "--layout",
        help="How pairs become model rows; never changes the numbers. prefix: one row per pair, the prompt run once. "
        "packed: several pairs per row under a FlexAttention block mask (GPU; compiles its kernel on the first batch). "
        "separate: prompt+chosen and prompt+rejected rows, as TRL runs them.",
    ),
]
Tokenizer = Annotated[Optional[str], typer.Option(help="Tokenizer to use instead of the reference's.")]
Revision = Annotated[
    Optional[str], typer.Option("--reference-revision", help="Hub revision (branch, tag or commit) of the reference.")
]
RevisionAlias = Annotated[Optional[str], typer.Option("--revision", hidden=True, help="Old --reference-revision")]
PolicyRevision = Annotated[Optional[str], typer.Option(help="Hub revision of the policy.")]
TrustRemoteCode = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code", metavar="", help="Allow model/tokenizer code from the hub to run (off by default)."
    ),
]
Split = Annotated[Optional[str], typer.Option(help="Dataset split, for a hub dataset or a save_to_disk directory.")]
IdColumn = Annotated[Optional[str], typer.Option(help="Column holding pair ids (default: 'id' if present).")]
PromptColumn = Annotated[
    str, typer.Option(help="Column holding the prompt (if absent, the prompt is split off the responses).")
]
ChosenColumn = Annotated[str, typer.Option(help="Column holding the chosen response.")]
RejectedColumn = Annotated[str, typer.Option(help="Column holding the rejected response.")]
DataFormatOpt = Annotated[
    DataFormat,
    typer.Option(
        "--data-format",
        help="How the pairs are shaped. auto: detect. standard: strings (an implicit prompt is split off as TRL's "
        "extract_prompt does). conversational: lists of {role, content} messages (also JSON-encoded, as in CSV). "
        "hh: Anthropic HH transcripts, split after the last shared '\\n\\nAssistant:'. rated: a prompt with rated "
        "completions (UltraFeedback), the best chosen and a random lower-rated one rejected (--binarize-seed); "
        "rated-best-worst: the worst rejected. shp: two responses with a label or scores (SHP). arena: two "
        "conversations and a winner (Chatbot Arena; ties dropped). kto: unpaired rows (prompt, completion, label), "
        "scored per response; paired data read as kto is unpaired as TRL's KTOTrainer does.",
    ),
]
_BINARIZE_SEED_HELP = "rated data: the seed that picks the rejected completion among those rated below the best"
BinarizeSeed = Annotated[int, typer.Option("--binarize-seed", metavar="SEED", help=_BINARIZE_SEED_HELP + ".")]
OptionalBinarizeSeed = Annotated[
    Optional[int],
    typer.Option(
        "--binarize-seed", metavar="SEED",
        help=f"{_BINARIZE_SEED_HELP} (default: the --from run's, else {options.RunOptions.binarize_seed}).",
    ),
]  # fmt: skip
Ches = Annotated[
    bool,
    typer.Option(
        "--ches/--no-ches", metavar="", show_default=False,
        help="CHES (centered hidden embedding similarity) from the reference pass, no extra forward pass: which "
        "pairs DPO is likely to push the chosen answer's likelihood down on. On by default.",
    ),
]  # fmt: skip
HighChesShare = Annotated[
    float,
    typer.Option(
        "--high-ches-share", metavar="SHARE", help="The share of pairs (0-1) flagged high_ches, by ches_norm."
    ),
]
ChatTemplate = Annotated[
    Optional[Path],
    typer.Option(
        "--chat-template", metavar="FILE", dir_okay=False,
        help="A Jinja chat template file for conversational data, used instead of the tokenizer's (or where it "
        "has none).",
    ),
]  # fmt: skip
CompatOpt = Annotated[
    Compat,
    typer.Option(
        "--compat",
        help="Tokenization conventions. trl1: TRL 1.x's DPOTrainer. trl0: TRL 0.x (parts tokenized apart, the "
        "prompt truncated from the left at --max-prompt-length). rewardbench: RewardBench's DPO scorer.",
    ),
]  # fmt: skip
MaxPromptLength = Annotated[
    Optional[int],
    typer.Option(
        "--max-prompt-length", metavar="TOKENS",
        help="--compat trl0 / rewardbench: keep the prompt's last TOKENS tokens (default 512 with trl0, 128 with "
        "rewardbench, as they do).",
    ),
]  # fmt: skip
GroupBy = Annotated[
    Optional[str],
    typer.Option(
        "--group-by", metavar="COLUMN",
        help="Also report every metric per value of this data column (summary.json: groups).",
    ),  # fmt: skip
]
Output = Annotated[
    Optional[Path],
    typer.Option(
        "--output", "-o", file_okay=False,
        help="Directory for pairs.parquet (responses.parquet for KTO rows), summary.json, report.md, junit.xml and "
        "report.html.",
    ),  # fmt: skip
]
FormatOpt = Annotated[
    OutputFormat, typer.Option("--format", "-f", help="stdout: a table for people, or the summary as JSON.")
]
TableFormatOpt = Annotated[
    TableFormat, typer.Option("--table-format", help="Format of the per-pair table written to --output.")
]
Top = Annotated[int, typer.Option(help="How many worst pairs (or KTO responses) to show per list.")]
NoCache = Annotated[
    bool, typer.Option("--no-cache", metavar="", help="Neither read nor write the per-pair log-prob cache.")
]
CacheDir = Annotated[
    Optional[str],
    typer.Option(help="Log-prob cache directory \\[default: $PREFDIAG_CACHE_DIR or ~/.cache/prefdiag]."),
]
Tp = Annotated[
    int,
    typer.Option(
        "--tp", metavar="N", min=1,
        help="Under torchrun: split each model over N ranks with transformers' tensor-parallel plan "
        "(tp_plan='auto'); W ranks make W/N data-parallel groups. See docs/distributed.md",
    ),
]  # fmt: skip
Quiet = Annotated[
    bool, typer.Option("--quiet", "-q", metavar="", help="Nothing on stderr but errors: no progress, logs or file list")
]
MinRules = Annotated[
    Optional[list[str]],
    typer.Option(
        "--min", metavar="METRIC=VALUE[:warn]",
        help="Gate: exit 1 unless METRIC >= VALUE (':warn' only reports). Repeatable. "
        "Example: --min ranking_accuracy=0.6",
    ),
]  # fmt: skip
MaxRules = Annotated[
    Optional[list[str]],
    typer.Option(
        "--max", metavar="METRIC=VALUE[:warn]",
        help="Gate: exit 1 unless METRIC <= VALUE (':warn' only reports). Repeatable. "
        "Example: --max negative_margin_regime_rate=0.1:warn",
    ),
]  # fmt: skip
GateFile = Annotated[
    Optional[Path],
    typer.Option(
        "--gate", metavar="FILE", dir_okay=False,
        help="TOML file with a \\[gate] table of min_<metric> / max_<metric> keys (used instead of "
        "\\[tool.prefdiag.gate] in ./pyproject.toml).",
    ),
]  # fmt: skip
Baseline = Annotated[
    Optional[Path],
    typer.Option(
        "--baseline", metavar="DIR",
        help="A previous run's --output directory: adds metric deltas and the pairs whose ranking flipped, and "
        "allows <metric>_drop / <metric>_delta rules.",
    ),
]  # fmt: skip
