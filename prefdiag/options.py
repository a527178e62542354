"""Every option of a run, its choices and its default, defined once (no torch import): the library validates
against these and the CLI builds its choices and help from them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from prefdiag.errors import UsageError

if TYPE_CHECKING:
    from prefdiag.data import ColumnMap

# Choices. The torch-side modules (models, scoring, data) check that they agree with these (tests/test_options.py).
DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: bfloat16 on a GPU that supports it, else float32
DEVICES = ("auto", "cpu", "cuda", "mps")
LAYOUTS = ("prefix", "packed", "separate")  # how pairs become model rows (prefdiag.scoring); never the numbers
SHAPED_FORMATS = ("rated", "rated-best-worst", "shp", "arena", "kto")  # other shapes (prefdiag.data.shapes)
DATA_FORMATS = ("auto", "standard", "conversational", "hh", *SHAPED_FORMATS)  # how the pairs are shaped (prefdiag.data)
COMPAT = ("trl1", "trl0", "rewardbench")  # tokenization conventions (prefdiag.tokenization.COMPAT_SCHEMES)
TABLE_FORMATS = ("parquet", "csv", "jsonl")  # the per-pair table written to --output
OUTPUT_FORMATS = ("table", "json")  # what is printed on stdout

# Padded tokens per forward pass, per device type; any other device type gets the "cpu" value.
BATCH_TOKENS = {"cuda": 16384, "cpu": 4096}
# An in-memory model's cache identity is a hash of its weights when they are at most this large (else: no cache,
# unless RunOptions.hash_weights is True).
FINGERPRINT_MAX_BYTES = 512 * 2**20
DEFAULT_TOP = 10  # worst pairs shown in the reports
DEFAULT_BETA = 0.1
HIGH_CHES_SHARE = 0.05  # high_ches flags the top 5% of pairs by ches_norm (prefdiag.ches)


def default_batch_tokens(device_type: str) -> int:
    """The batch size in padded tokens used when --batch-tokens is not given."""
    return BATCH_TOKENS.get(device_type, BATCH_TOKENS["cpu"])


def batch_tokens_help() -> str:
    """The default of --batch-tokens, in words, for the CLI's help."""
    return f"default {BATCH_TOKENS['cuda']} on GPU, {BATCH_TOKENS['cpu']} on CPU"


@dataclass
class RunOptions:
    """Everything about a run that is not the data or the models."""

    beta: float = DEFAULT_BETA
    dtype: str = "auto"
    device: str = "auto"
    max_length: int | None = None
    batch_tokens: int | None = None  # None: default_batch_tokens(device type)
    shard: bool = False  # spread each model over every visible GPU (device_map="auto"), for models larger than one
    layout: str = "prefix"  # prefix | packed | separate (see prefdiag.scoring); never changes the numbers
    tokenizer: str | None = None
    reference_revision: str | None = None
    policy_revision: str | None = None
    trust_remote_code: bool = False
    split: str | None = None
    columns: ColumnMap = field(default_factory=lambda: _column_map())
    cache: bool = True  # reuse and save per-pair log-probs on disk (see prefdiag.cache)
    cache_dir: str | None = None
    data_format: str = "auto"  # one of DATA_FORMATS (see prefdiag.data)
    binarize_seed: int = 0  # rated data: which of the other completions becomes the rejected one
    group_by: str | None = None  # a data column: summary["groups"] holds the metrics per value
    ches: bool = True  # CHES from the reference pass (no extra forward pass; see prefdiag.ches)
    high_ches_share: float = HIGH_CHES_SHARE  # the share of pairs flagged high_ches, by ches_norm
    chat_template: str | None = None  # a Jinja file put on the tokenizer (replacing any chat template it has)
    compat: str = "trl1"  # tokenization conventions: trl1 (TRL 1.x), trl0 (TRL 0.x), rewardbench
    max_prompt_length: int | None = None  # trl0 / rewardbench: the prompt truncated from the left to this length
    tp: int = 1  # tensor-parallel ranks per model under torchrun (transformers' tp_plan="auto"); see prefdiag.parallel
    hash_weights: bool | None = None  # an in-memory model's cache identity: None hashes its weights up to
    # FINGERPRINT_MAX_BYTES (else no cache), True hashes any size, False never caches it

    def validate(self) -> None:
        """Refuse a bad value with a UsageError naming the option."""
        _choice("--data-format", self.data_format, DATA_FORMATS)
        _choice("--dtype", self.dtype, DTYPES)
        _choice("--device", self.device, DEVICES)
        _choice("--layout", self.layout, LAYOUTS)
        _choice("--compat", self.compat, COMPAT)
        if self.max_prompt_length is not None and (self.compat == "trl1" or self.max_prompt_length < 1):
            raise UsageError("--max-prompt-length must be a positive number of tokens, and applies to --compat trl0 "
                             f"and rewardbench only (TRL 1.x has no prompt limit); got {self.max_prompt_length} "
                             f"with {self.compat}")  # fmt: skip
        if not 0.0 <= self.high_ches_share <= 1.0:  # NaN fails too
            raise UsageError(f"--high-ches-share must be between 0 and 1, got {self.high_ches_share}")
        if not self.beta > 0:
            raise UsageError(f"--beta must be > 0, got {self.beta}")
        if not math.isfinite(self.beta):
            raise UsageError(f"--beta must be a finite number, got {self.beta}")
        if self.max_length is not None and self.max_length < 2:
            raise UsageError(f"--max-length must be at least 2, got {self.max_length}")
        if self.batch_tokens is not None and self.batch_tokens < 1:
            raise UsageError(f"--batch-tokens must be positive, got {self.batch_tokens}")
        if self.tp < 1:
            raise UsageError(f"--tp must be at least 1, got {self.tp}")
        if self.tp > 1 and self.shard:
            raise UsageError("--tp and --shard are alternatives: --tp splits each model over ranks, --shard over GPUs")

    def record(self) -> dict[str, Any]:
        """The options as summary.json's provenance records them."""
        record = asdict(self)
        record["columns"] = asdict(self.columns)
        if self.hash_weights is None:
            del record["hash_weights"]  # keep summaries of path-based runs as they were
        return record


def _column_map() -> ColumnMap:
    from prefdiag.data import ColumnMap  # pandas and pyarrow: not for `prefdiag --help`

    return ColumnMap()


def _choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")
