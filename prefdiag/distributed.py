"""Several processes scoring one dataset (torch.distributed): rank helpers that work without a process group, a
deterministic token-balanced split of pair indices over ranks, and a gather of per-pair arrays, so that results do
not depend on the number of processes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _group_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank; 0 without an initialised process group."""
    if not _group_ready():
        return 0
    import torch.distributed as dist

    return dist.get_rank()


def world_size() -> int:
    """The number of processes; 1 without an initialised process group."""
    if not _group_ready():
        return 1
    import torch.distributed as dist

    return dist.get_world_size()


def is_main() -> bool:
    return rank() == 0


def split_by_tokens(lengths: Sequence[int], n_ranks: int) -> list[np.ndarray]:
    """Pair indices for each rank, balanced by tokens: pairs sorted longest first (ties by index), each given to the
    rank with the fewest tokens so far (ties to the lowest rank). Deterministic; every index appears exactly once;
    each rank's indices are sorted."""
    if n_ranks < 1:
        raise ValueError(f"n_ranks must be at least 1, got {n_ranks}")
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.lexsort((np.arange(len(lengths)), -lengths))  # longest first, then by index
    load = np.zeros(n_ranks, dtype=np.int64)
    shares: list[list[int]] = [[] for _ in range(n_ranks)]
    for i in order:
        target = int(np.argmin(load))  # argmin returns the first minimum: the lowest rank wins ties
        shares[target].append(int(i))
        load[target] += max(int(lengths[i]), 1)
    return [np.sort(np.asarray(s, dtype=np.int64)) for s in shares]


def my_share(lengths: Sequence[int]) -> np.ndarray:
    """This rank's pair indices under split_by_tokens (all of them in a single process)."""
    return split_by_tokens(lengths, world_size())[rank()]


def gather_pairs(
    n: int, indices: np.ndarray, values: dict[str, np.ndarray], to_all: bool = True
) -> dict[str, np.ndarray] | None:
    """Assemble per-pair float arrays of length ``n`` from each rank's ``indices`` and ``values`` (one entry per
    index). Every rank gets the result with ``to_all``, otherwise rank 0 only (the others get None). Pairs no rank
    sent are NaN. In a single process it only places the values."""
    indices = np.asarray(indices, dtype=np.int64)
    local = (indices, {k: np.asarray(v, dtype=np.float64) for k, v in values.items()})
    if world_size() == 1:
        parts = [local]
    else:
        import torch.distributed as dist

        if to_all:
            parts = [None] * world_size()
            dist.all_gather_object(parts, local)
        else:
            parts = [None] * world_size() if rank() == 0 else None
            dist.gather_object(local, parts, dst=0)
            if rank() != 0:
                return None
    out = {k: np.full(n, np.nan) for k in values}
    for part_indices, part_values in parts:
        for k, v in part_values.items():
            out[k][part_indices] = v
    return out
