"""On-disk caches: per-pair log-probs, so a second run with an unchanged model skips its pass and an interrupted
run resumes where it stopped; and the token ids of a whole dataset (``<root>/tokens/<key>.npz``, keyed by
``prefdiag.tokenization.tokenization_key``), so a rerun on the same data does not tokenize again.

Layout: ``<root>/<model key>/shard-*.parquet``, each shard holding ``pair_key, chosen_logp, rejected_logp`` and
the further per-pair columns the engine computed (``scorer.extras``, e.g. ``ches``), plus ``model.json``.
The model key hashes what decides the numbers besides the tokens: the model's identity (path or hub id, revision,
commit, a fingerprint of the weight files), dtype, device type and the scoring code's version. The pair key hashes
the pair's token ids (prompt, chosen, rejected), so the tokenizer, chat template, truncation settings and the
dataset's content are all part of it, and a dataset that gained or reordered pairs still hits the cache.
The root is ``$PREFDIAG_CACHE_DIR``, else ``$XDG_CACHE_HOME/prefdiag``, else ``~/.cache/prefdiag``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from prefdiag.errors import first_line
from prefdiag.tokenization import TokenizedPairs

log = logging.getLogger(__name__)

# Bump when a change to scoring changes numbers or the shards' content, so old caches are not reused.
SCORING_VERSION = 3  # 2: sliding-window layers masked to their window; 3: shards hold the engine's extras columns
STALE_SECONDS = 3600.0  # a temporary file older than this was left by a process that died


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
    sweep_stale_temporaries(path.parent)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)

    _write_atomically(path, write)


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
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - truncated, BadZipFile, garbage: a miss, rebuilt by this run
        log.warning("ignoring an unreadable token cache %s: %s", path, first_line(exc))
        return None


class LogProbCache:
    """Per-pair log-probs (and any further per-pair columns the engine computed) of one model, read at start and
    appended to as batches finish. A cache is only a cache: a shard that cannot be read is skipped with a warning,
    and one that cannot be written is a warning, never a failed run."""

    def __init__(self, root: Path, key: str, identity: dict[str, Any], flush_seconds: float = 30.0) -> None:
        self.dir = Path(root) / key
        self.identity = identity
        self.flush_seconds = flush_seconds
        self._pending: list[dict[str, Any]] = []
        self._last_flush = time.monotonic()
        self._write_failed = False

    def load(self) -> pd.DataFrame:
        """Every cached pair of this model, indexed by pair key, with chosen_logp, rejected_logp and the extras
        columns some shard holds (NaN where a shard lacked one). Unreadable shards (a crash mid-write, a truncated
        or foreign file) are ignored with a warning."""
        frames = []
        if self.dir.is_dir():
            sweep_stale_temporaries(self.dir)
            for shard in sorted(self.dir.glob("shard-*.parquet")):
                try:
                    frames.append(pq.read_table(shard).to_pandas())
                except Exception as exc:  # noqa: BLE001 - any unreadable file is a cache miss
                    log.warning("ignoring an unreadable cache shard %s: %s", shard, first_line(exc))
        frames = [f for f in frames if "pair_key" in f.columns and {"chosen_logp", "rejected_logp"} <= set(f.columns)]
        if not frames:
            return pd.DataFrame(columns=["chosen_logp", "rejected_logp"], index=pd.Index([], name="pair_key"))
        table = pd.concat(frames, ignore_index=True).drop_duplicates("pair_key", keep="last")
        return table.set_index("pair_key")

    def add(
        self, keys: list[str], chosen: np.ndarray, rejected: np.ndarray, extras: dict[str, np.ndarray] | None = None
    ) -> None:
        """Queue finished pairs (with their extras columns); written to disk at least every flush_seconds."""
        columns = {"pair_key": list(keys), "chosen_logp": np.asarray(chosen, float)}
        columns["rejected_logp"] = np.asarray(rejected, float)
        columns.update({name: np.asarray(values, float) for name, values in (extras or {}).items()})
        self._pending.append(columns)
        if time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Write queued pairs as one new shard, atomically (temp file then rename); a write failure only warns."""
        if not self._pending:
            return
        frame = pd.concat([pd.DataFrame(columns) for columns in self._pending], ignore_index=True)
        table = pa.Table.from_pandas(frame, preserve_index=False)
        self._pending.clear()
        self._last_flush = time.monotonic()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            meta = self.dir / "model.json"
            if not meta.exists():
                _write_atomically(meta, lambda tmp: tmp.write_text(json.dumps(self.identity, indent=2, default=str)))
            name = f"shard-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"
            _write_atomically(self.dir / name, lambda tmp: pq.write_table(table, tmp))
        except OSError as exc:
            if not self._write_failed:  # once per model: the run goes on, only slower next time
                log.warning("cannot save log-probs to the cache (%s): %s", self.dir, first_line(exc))
            self._write_failed = True


def _write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """Write through a temporary file beside ``path``, renamed over it; the temporary never outlives a failure."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sweep_stale_temporaries(directory: Path, older_than_seconds: float = STALE_SECONDS) -> None:
    """Remove temporary files (``.*.tmp``) a killed process left behind, once they are older than an hour."""
    cutoff = time.time() - older_than_seconds
    try:
        for tmp in directory.glob(".*.tmp"):
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink(missing_ok=True)
    except OSError:
        pass
