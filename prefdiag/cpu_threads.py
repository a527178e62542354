"""How torch's CPU threads wait for work: set by the command line before torch is imported."""

from __future__ import annotations

import os


def passive_openmp_waits() -> None:
    """Let idle OpenMP threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``), unless the environment
    already names a policy. On a CPU shared with other processes, threads that spin while their partner is
    descheduled made scoring 2.5-3.5x slower with 2 threads on 2 cores (and slower than 1 thread); no number
    changes. OpenMP reads the variable when torch loads it, so this only acts before ``import torch``."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
