"""How a summary value is written for people (rates as percentages, counts as integers, 4 significant digits):
one formatter shared by the verdict's sentences and every report, so a sentence quotes the table's numbers."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def base_name(key: str) -> str:
    """The summary key a metric name formats like: groups.x.m -> m, m_drop -> m, quantiles.c.p05 -> p05."""
    key = key.rpartition(".")[2]
    for suffix in ("_drop", "_delta"):
        if key.endswith(suffix):
            return key.removesuffix(suffix)
    return key


def is_rate(key: str) -> bool:
    return base_name(key).endswith(("_rate", "_accuracy", "_accuracy_per_token"))


def format_value(key: str, value: Any) -> str:
    """Rates and accuracies as percentages, counts as integers, other numbers with 4 significant digits."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    base = base_name(key)
    change = key.endswith(("_drop", "_delta"))
    if base.startswith("n_") or base.startswith("ref_correct_to") or base.startswith("ref_incorrect_to"):
        if float(value).is_integer():
            return f"{int(value):+d}" if change else str(int(value))
    if change and is_rate(key):
        return f"{100 * value:+.1f} pp"
    if change:
        return f"{value:+.4g}"
    if is_rate(key):
        return f"{100 * value:.1f}%"
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return str(value)


def plural(n: int, word: str, many: str | None = None) -> str:
    """"1 rule", "2 rules" ("1 pair", "0 pairs"); ``many`` for irregular plurals."""
    return f"{n} {word if n == 1 else many or word + 's'}"
