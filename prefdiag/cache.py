"""On-disk caches: per-pair log-probs, so a second run with an unchanged model skips its pass and an interrupted
run resumes where it stopped; and the token ids of a whole dataset (``<root>/tokens/<key>.npz``, keyed by
``prefdiag.tokenization.tokenization_key``), so a rerun on the same data does not tokenize again.

Layout: ``<root>/<model key>/shard-*.parquet``, each shard holding ``pair_key, chosen_logp, rejected_logp``.
The model key hashes what decides the numbers besides the tokens: the model's identity (path or hub id, revision,
commit, a fingerprint of the weight files), dtype, device type and the scoring code's version. The pair key hashes
the pair's token ids (prompt, chosen, rejected), so the tokenizer, chat template, truncation settings and the
dataset's content are all part of it, and a dataset that gained or reordered pairs still hits the cache.
The root is ``$PREFDIAG_CACHE_DIR``, else ``$XDG_CACHE_HOME/prefdiag``, else ``~/.cache/prefdiag``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prefdiag.tokenization import TokenizedPairs

# Bump when a change to scoring changes numbers, so old caches are not reused.
SCORING_VERSION = 2  # 2: sliding-window layers masked to their window


def default_cache_dir() -> Path:
    """Where the cache lives unless --cache-dir says otherwise."""
    if os.environ.get("PREFDIAG_CACHE_DIR"):
        return Path(os.environ["PREFDIAG_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "prefdiag"


def model_key(identity: dict[str, Any]) -> str:
    """A stable hash of a model's identity record plus the scoring version."""
    payload = json.dumps({**identity, "scoring_version": SCORING_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def pair_keys(prompt_ids: Sequence[Sequence[int]], chosen_ids, rejected_ids) -> list[str]:
    """One hash per pair of its token ids (the three parts kept apart)."""
    keys = []
    for p, c, r in zip(prompt_ids, chosen_ids, rejected_ids):
        digest = hashlib.blake2b(digest_size=16)
        for part in (p, c, r):
            digest.update(np.asarray(part, dtype=np.int64).tobytes())
            digest.update(b"|")
        keys.append(digest.hexdigest())
    return keys


def save_tokenized(path: Path, tokenized: TokenizedPairs) -> None:
    """Write a tokenization (ids, lengths, flags, settings) to one .npz file, atomically."""
    arrays = {
        "chosen_full_tokens": tokenized.chosen_full_tokens,
        "rejected_full_tokens": tokenized.rejected_full_tokens,
        "boundary_mismatch": tokenized.boundary_mismatch,
        "truncated": tokenized.truncated,
        "dropped": tokenized.dropped,
        "settings": np.array(json.dumps(tokenized.settings, default=str)),
    }
    for part in ("prompt", "chosen", "rejected"):
        ids = getattr(tokenized, f"{part}_ids")
        arrays[f"{part}_lengths"] = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        arrays[f"{part}_ids"] = np.fromiter((t for row in ids for t in row), dtype=np.int32)  # any vocabulary fits
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    os.replace(tmp, path)


def load_tokenized(path: Path) -> TokenizedPairs | None:
    """A tokenization saved by save_tokenized, or None if the file is missing or unreadable."""
    try:
        with np.load(path) as data:
            parts = {}
            for part in ("prompt", "chosen", "rejected"):
                splits = np.cumsum(data[f"{part}_lengths"])[:-1]
                parts[part] = [row.tolist() for row in np.split(data[f"{part}_ids"], splits)]
            return TokenizedPairs(
                parts["prompt"], parts["chosen"], parts["rejected"], data["chosen_full_tokens"],
                data["rejected_full_tokens"], data["boundary_mismatch"], data["truncated"], data["dropped"],
                json.loads(str(data["settings"])),
            )  # fmt: skip
    except (OSError, ValueError, KeyError):
        return None


class LogProbCache:
    """Per-pair (chosen, rejected) log-probs of one model, read at start and appended to as batches finish."""

    def __init__(self, root: Path, key: str, identity: dict[str, Any], flush_seconds: float = 30.0) -> None:
        self.dir = Path(root) / key
        self.identity = identity
        self.flush_seconds = flush_seconds
        self._pending: list[tuple[list[str], np.ndarray, np.ndarray]] = []
        self._last_flush = time.monotonic()

    def load(self) -> dict[str, tuple[float, float]]:
        """Every cached pair of this model; unreadable shards (a crash mid-write) are ignored."""
        found: dict[str, tuple[float, float]] = {}
        if not self.dir.is_dir():
            return found
        for shard in sorted(self.dir.glob("shard-*.parquet")):
            try:
                table = pq.read_table(shard).to_pydict()
            except (OSError, pa.ArrowInvalid):
                continue
            found.update(zip(table["pair_key"], zip(table["chosen_logp"], table["rejected_logp"])))
        return found

    def add(self, keys: list[str], chosen: np.ndarray, rejected: np.ndarray) -> None:
        """Queue finished pairs; written to disk at least every flush_seconds."""
        self._pending.append((keys, np.asarray(chosen, float), np.asarray(rejected, float)))
        if time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Write queued pairs as one new shard, atomically (temp file then rename)."""
        if not self._pending:
            return
        keys = [k for batch in self._pending for k in batch[0]]
        chosen = np.concatenate([batch[1] for batch in self._pending])
        rejected = np.concatenate([batch[2] for batch in self._pending])
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "model.json"
        if not meta.exists():
            meta.write_text(json.dumps(self.identity, indent=2, default=str))
        name = f"shard-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = self.dir / f".{name}.tmp"
        pq.write_table(pa.table({"pair_key": keys, "chosen_logp": chosen, "rejected_logp": rejected}), tmp)
        os.replace(tmp, self.dir / name)
        self._pending.clear()
        self._last_flush = time.monotonic()
