"""Data-parallel scoring under torchrun / accelerate launch: the process group set up from the launcher's environment,
and :class:`DistributedScorer`, a wrapper around any scorer that scores this rank's token-balanced share of the pairs
and gathers every rank's results, after an exchange of each rank's status so that a failure on one rank stops all.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import numpy as np

from prefdiag import distributed
from prefdiag.errors import ModelError, PrefdiagError, RunError, UsageError, first_line

log = logging.getLogger(__name__)

PROGRESS_POLL_SECONDS = 0.5


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun / accelerate launch set it (1 when not launched by them); no torch import."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def launched_rank() -> int:
    """RANK as the launcher set it (0 when not launched by one); no torch import."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def init_from_launcher(device_type: str) -> bool:
    """Join the process group the launcher describes (WORLD_SIZE > 1 and no group yet): nccl on CUDA (each rank on
    its LOCAL_RANK GPU), gloo otherwise. Returns True when this call created the group."""
    import torch
    import torch.distributed as dist

    if launched_world_size() <= 1 or distributed._group_ready():
        return False
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    atexit.register(_leave)
    log.debug("rank %d of %d joined the process group (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return True


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_device(device: Any) -> Any:
    """This rank's device: a CUDA device without an index becomes cuda:LOCAL_RANK under a launcher."""
    import torch

    if device.type == "cuda" and device.index is None and launched_world_size() > 1:
        return torch.device("cuda", local_rank())
    return device


def check_tp(tp: int) -> None:
    """--tp N needs exactly N processes: transformers 5.x builds its tensor-parallel mesh over the whole process
    group, and a (replicas x tp) mesh wraps the model in FSDP, whose hooks fail under inference mode."""
    world = distributed.world_size()
    if tp < 1:
        raise UsageError(f"--tp must be at least 1, got {tp}")
    if tp > 1 and world != tp:
        raise UsageError(
            f"--tp {tp} needs exactly {tp} processes (one tensor-parallel group), got {world}",
            hint=f"run torchrun --nproc-per-node {tp}; for more throughput, data parallelism (no --tp) if the "
            "model fits one GPU",
        )


def check_tp_plan(config: Any, name: str, tp: int) -> None:
    """A model to load with --tp must declare a tensor-parallel plan (transformers' ``base_model_tp_plan``)."""
    if tp > 1 and not getattr(config, "base_model_tp_plan", None):
        raise ModelError(
            f"{name}: {type(config).__name__} has no tensor-parallel plan (base_model_tp_plan), so --tp {tp} "
            "cannot split it",
            hint="use --shard (one process over several GPUs) or fewer ranks per model (no --tp)",
        )


def data_parallel_layout(tp: int = 1) -> tuple[int, int]:
    """(this rank's data-parallel group index, the number of groups): ranks r*tp .. r*tp+tp-1 form group r."""
    return distributed.rank() // tp, max(distributed.world_size() // tp, 1)


class RankFailed(RunError):
    """Another rank failed while scoring; the message names the rank and its cause. Raised on every rank that did
    not fail itself; the CLI prints it on rank 0 only (``echoes_another_rank``)."""

    echoes_another_rank = True


class RankRefused(UsageError):
    """Another rank refused its model or input (exit 2, as that rank's own error); the message names the rank."""

    echoes_another_rank = True


class DistributedScorer:
    """Scores this rank's share of the pairs with ``inner`` (typically a CachedScorer around a ModelScorer, so each
    rank reads and writes the cache for its own pairs), then every rank gets every pair's results.

    The share is ``prefdiag.distributed.split_by_tokens`` over the pairs asked for (by prompt + chosen + rejected
    tokens) among the data-parallel groups (``tp`` ranks each). Before gathering, the ranks exchange their status:
    if any rank raised, every rank raises :class:`RankFailed` naming the first failed rank and its cause.
    ``progress_bar(total)`` is called on rank 0 only; it advances with every rank's pairs (a counter in the process
    group's store)."""

    _calls = 0  # one store key per scoring pass in this process group (every rank makes the same calls)

    def __init__(self, inner: Any, progress_bar: Any = None, tp: int = 1) -> None:
        self.inner, self.progress_bar, self.tp = inner, progress_bar, tp
        self.extras: dict[str, np.ndarray] = {}
        self.record: dict[str, Any] = {}
        self.pairs_from_cache = 0
        self.tokens = {"real": 0, "computed": 0}

    def score(
        self,
        tokenized: Any,
        progress: Any = None,
        pairs: Sequence[int] | None = None,
        on_pairs_done: Any = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        import torch.distributed as dist

        n = len(tokenized)
        dropped = np.asarray(tokenized.dropped, dtype=bool)
        asked = np.flatnonzero(~dropped) if pairs is None else np.asarray(pairs, dtype=np.int64)
        asked = asked[~dropped[asked]]
        # What each pair costs the engine: a tie (an unpaired KTO row) lays its completion out once (prefdiag.rows).
        lengths = tokenized.prompt_tokens + tokenized.chosen_tokens + np.where(tokenized.tied, 0,
                                                                               tokenized.rejected_tokens)
        group, groups = data_parallel_layout(self.tp)
        share = asked[distributed.split_by_tokens(np.asarray(lengths)[asked], groups)[group]]
        counter = _StoreCounter(f"prefdiag/progress/{DistributedScorer._calls}")
        DistributedScorer._calls += 1
        bar = self.progress_bar(len(asked)) if self.progress_bar is not None and distributed.is_main() else None
        watcher = counter.watch(bar) if bar is not None else None
        status: dict[str, Any] = {"ok": True}
        chosen = rejected = np.full(n, np.nan)
        tp_lead = distributed.rank() % self.tp == 0  # in a tensor-parallel group one rank speaks for all
        add = counter.add if tp_lead else (lambda n_done: None)
        try:
            try:
                chosen, rejected = self.inner.score(tokenized, add, share, on_pairs_done)
                add(int(getattr(self.inner, "pairs_from_cache", 0)))
            except KeyboardInterrupt:
                raise  # a signal: torchrun stops every rank; the interrupted rank's cache is already saved
            except Exception as exc:  # noqa: BLE001 - reported on every rank by the status exchange below
                status = {"ok": False, "cause": first_line(exc, with_type=not isinstance(exc, PrefdiagError))}
                status["usage"] = isinstance(exc, UsageError)
                failure = exc
            statuses = _exchange(status)  # every rank has finished (or failed) its share
        finally:
            if watcher is not None:
                watcher.stop()
        failed = [(r, s) for r, s in enumerate(statuses) if not s["ok"]]
        if failed:
            first, info = failed[0]
            if not status["ok"] and info.get("usage"):
                raise failure  # a bad model or input: its own message and exit code (2) on each rank that refused
            raise (RankRefused if info.get("usage") else RankFailed)(f"rank {first} failed: {info['cause']}")
        sent = share if tp_lead else share[:0]
        values = {"chosen": chosen[sent], "rejected": rejected[sent]}
        values.update({f"extra:{k}": np.asarray(v, float)[sent] for k, v in getattr(self.inner, "extras", {}).items()})
        gathered = distributed.gather_pairs(n, sent, values, to_all=True)
        self.extras = {k.removeprefix("extra:"): v for k, v in gathered.items() if k.startswith("extra:")}
        self._gather_records(tp_lead)
        return gathered["chosen"], gathered["rejected"]

    def _gather_records(self, tp_lead: bool) -> None:
        """The pass's report record (from the first rank that loaded the model) and the counts summed over ranks."""
        import torch.distributed as dist

        engine = getattr(self.inner, "inner", self.inner)
        mine = {
            "record": dict(getattr(engine, "record", {}) or {}),
            "from_cache": int(getattr(self.inner, "pairs_from_cache", 0)) if tp_lead else 0,
            "tokens": dict(getattr(engine, "tokens", {})) if tp_lead else {},
        }
        parts: list[Any] = [None] * distributed.world_size()
        dist.all_gather_object(parts, mine)
        self.record = next((p["record"] for p in parts if p["record"]), {})
        self.pairs_from_cache = sum(p["from_cache"] for p in parts)
        self.tokens = {k: sum(p["tokens"].get(k, 0) for p in parts) for k in ("real", "computed")}


def _exchange(status: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's status; a rank that died (killed, lost) before sending its own is a RankFailed here."""
    import torch.distributed as dist

    statuses: list[Any] = [None] * distributed.world_size()
    try:
        dist.all_gather_object(statuses, status)
    except RuntimeError as exc:  # gloo / nccl: a peer's connection closed
        raise RankFailed(f"a rank stopped before reporting (killed or lost): {first_line(exc)}") from exc
    return statuses


class _StoreCounter:
    """A job-wide count of finished pairs in the process group's key-value store (every rank adds to it)."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.store = _default_store()

    def add(self, n: int) -> None:
        if self.store is not None and n:
            self.store.add(self.key, int(n))

    def value(self) -> int:
        return int(self.store.add(self.key, 0)) if self.store is not None else 0

    def watch(self, advance: Any) -> "_Watcher":
        return _Watcher(self, advance)


class _Watcher:
    """Advances rank 0's progress bar to the job-wide count, polling the store in a background thread."""

    def __init__(self, counter: _StoreCounter, advance: Any) -> None:
        self.counter, self.advance, self.shown = counter, advance, 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(PROGRESS_POLL_SECONDS):
            self._update()

    def _update(self) -> None:
        try:
            now = self.counter.value()
        except Exception:  # noqa: BLE001 - a store gone with a failed peer: the status exchange reports it
            return
        if now > self.shown:
            self.advance(now - self.shown)
            self.shown = now

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()
        self._update()


def _default_store():
    """The default process group's store (torch's c10d key-value store), or None without one."""
    try:
        import torch.distributed.distributed_c10d as c10d

        return c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no store: no job-wide progress, scoring unaffected
        return None


def world_size() -> int:
    """The number of processes in the process group (1 without one)."""
    return distributed.world_size()


def distribute(scorer: Any, progress_bar: Any = None, tp: int = 1) -> Any:
    """``scorer`` wrapped in a :class:`DistributedScorer` when several processes share the job, else unchanged."""
    if distributed.world_size() <= 1:
        return scorer
    return DistributedScorer(scorer, progress_bar, tp)


def tensor_parallel_kwargs(
    name: str, tp: int, device: Any, *, revision: str | None = None, trust_remote_code: bool = False
) -> dict[str, Any]:
    """``from_pretrained`` arguments that split the model over this rank's tensor-parallel group with the model's
    own plan: a (data-parallel, tensor-parallel) device mesh over the process group, ``tp_plan="auto"``. Raises a
    ModelError (exit 2) for an architecture without a plan."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - reported as the model that cannot load
        raise ModelError(f"cannot read the config of {name!r}: {first_line(exc)}") from exc
    check_tp_plan(config, name, tp)
    from transformers.distributed.configuration_utils import DistributedConfig

    return {"distributed_config": DistributedConfig(tp_size=tp, tp_plan="auto")}
