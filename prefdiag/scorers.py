"""The scorer interface (tokenized pairs in, per-pair log-probs out), the engine on a lazily loaded model as its first
implementation, and the on-disk cache as a wrapper around any scorer (as lm-evaluation-harness's CachingLM)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from prefdiag import interrupt
from prefdiag.errors import Interrupted
from prefdiag.phases import phase

log = logging.getLogger(__name__)

Advance = Callable[[int], None]  # progress: n more pairs are done
# on_pairs_done(indices, chosen, rejected, extras): called as pairs finish, extras = {name: values for indices}
PairsDone = Callable[[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]], None]



def pairs_to_score(tokenized: Any, pairs: Sequence[int] | None) -> np.ndarray:
    """The pair indices a score() call covers: ``pairs``, or every pair the tokenization did not drop."""
    return np.flatnonzero(~np.asarray(tokenized.dropped)) if pairs is None else np.asarray(pairs, dtype=np.int64)

class Scorer(Protocol):
    """Scores tokenized pairs: summed completion log-probs of chosen and rejected, one float64 per pair (NaN where
    not scored), and after the run ``extras``, the further per-pair float64 columns it computed.
    ``prefdiag.scoring.LogProbScorer`` has this shape; so do :class:`ModelScorer` and :class:`CachedScorer`."""

    extras: dict[str, np.ndarray]

    def score(
        self,
        tokenized: Any,
        progress: Advance | None = None,
        pairs: Sequence[int] | None = None,
        on_pairs_done: PairsDone | None = None,
    ) -> tuple[np.ndarray, np.ndarray]: ...


class ModelScorer:
    """The engine (``prefdiag.scoring.LogProbScorer``) on a model that is loaded only when there are pairs to score.

    ``source`` is a :class:`prefdiag.sources.ModelSource`; ``progress_bar(total)`` makes the progress callback once
    the number of pairs to score is known. After a run, ``record`` holds what the report says about the pass (the
    model's provenance, the layout and batch size used, padding) and ``tokens`` the engine's token counts."""

    def __init__(self, source: Any, settings: Any, progress_bar: Callable[[int], Advance | None] | None = None) -> None:
        self.source, self.settings, self.progress_bar = source, settings, progress_bar
        self.extras: dict[str, np.ndarray] = {}
        self.record: dict[str, Any] = {}
        self.tokens = {"real": 0, "computed": 0}

    def score(
        self,
        tokenized: Any,
        progress: Advance | None = None,
        pairs: Sequence[int] | None = None,
        on_pairs_done: PairsDone | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        from prefdiag.scoring import LogProbScorer

        todo = pairs_to_score(tokenized, pairs)
        if progress is None and self.progress_bar is not None:
            progress = self.progress_bar(len(todo))
        done_so_far = 0

        def pairs_done(indices: np.ndarray, chosen: np.ndarray, rejected: np.ndarray, extras: dict) -> None:
            nonlocal done_so_far
            if on_pairs_done is not None:
                on_pairs_done(indices, chosen, rejected, extras)  # saved (by a CachedScorer) before any stop
            done_so_far += len(indices)
            interrupt.check(done_so_far, len(todo))  # a SIGINT / SIGTERM stops here, at the end of a batch

        with self.source.ready() as model:
            engine = LogProbScorer(model, self.settings)
            with interrupt.deferred(), phase("score"):  # deferring first: a signal as the phase starts waits too
                chosen, rejected = engine.score(tokenized, progress, todo, pairs_done)
            interrupt.check(done_so_far, len(todo))
            self.record = self.source.provenance()
        self.extras, self.tokens = engine.extras, engine.tokens
        computed = engine.tokens["computed"]
        self.record.update(
            layout=engine.settings.layout,
            batch_tokens=engine.settings.batch_tokens,  # smaller than asked for after an out-of-memory
            first_batch_seconds=round(engine.first_batch_seconds, 3),
            padding_fraction=round(1 - engine.tokens["real"] / computed, 4) if computed else 0.0,
        )
        return chosen, rejected


class CachedScorer:
    """Serves the pairs ``cache`` (a :class:`prefdiag.cache.LogProbCache`) holds and passes only the rest to the
    scorer it wraps, saving them as batches finish, so an interrupted run resumes and a fully cached model is
    never loaded. ``keys`` are the pairs' cache keys (``prefdiag.cache.pair_keys``); a cached pair that lacks one
    of the ``extras`` now wanted (or holds NaN there) counts as a miss. ``pairs_from_cache`` is set by a run."""

    def __init__(self, inner: Scorer, cache: Any, keys: Sequence[str], extras: Sequence[str] = ()) -> None:
        self.inner, self.cache, self.keys, self.wanted = inner, cache, list(keys), tuple(extras)
        self.extras: dict[str, np.ndarray] = {}
        self.pairs_from_cache = 0

    def score(
        self,
        tokenized: Any,
        progress: Advance | None = None,
        pairs: Sequence[int] | None = None,
        on_pairs_done: PairsDone | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        n = len(tokenized)
        wanted = np.zeros(n, dtype=bool)
        wanted[pairs_to_score(tokenized, pairs)] = True
        wanted &= ~np.asarray(tokenized.dropped)
        with phase("cache_io"):
            found = self.cache.load().reindex(self.keys)
        chosen = np.where(wanted, found["chosen_logp"].to_numpy(float), np.nan)
        rejected = np.where(wanted, found["rejected_logp"].to_numpy(float), np.nan)
        self.extras = {
            name: np.where(wanted, found[name].to_numpy(float), np.nan) if name in found else np.full(n, np.nan)
            for name in self.wanted
        }
        missing = np.isnan(chosen) | np.isnan(rejected)
        for values in self.extras.values():
            missing |= np.isnan(values)
        todo = np.flatnonzero(wanted & missing)
        self.pairs_from_cache = int(wanted.sum() - len(todo))
        if len(todo) == 0:
            return chosen, rejected

        def save(done: np.ndarray, done_chosen: np.ndarray, done_rejected: np.ndarray, extras: dict) -> None:
            self.cache.add([self.keys[i] for i in done], done_chosen, done_rejected, extras)
            if on_pairs_done is not None:
                on_pairs_done(done, done_chosen, done_rejected, extras)

        try:
            scored_c, scored_r = self.inner.score(tokenized, progress, todo, save)
        except Interrupted as stop:  # count the pairs served from the cache as done
            if stop.done is not None and stop.total is not None:
                stop.done, stop.total = stop.done + self.pairs_from_cache, stop.total + self.pairs_from_cache
            raise
        finally:
            with phase("cache_io"):
                self.cache.flush()
        chosen[todo], rejected[todo] = scored_c[todo], scored_r[todo]
        for name, values in self.inner.extras.items():
            column = self.extras.setdefault(name, np.full(n, np.nan))
            column[todo] = np.asarray(values, float)[todo]
        return chosen, rejected
