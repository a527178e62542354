"""How torch's CPU threads wait for work: chosen by the command line before torch is imported."""

from __future__ import annotations

import os


def passive_openmp_waits(load: float | None = None, cpus: int | None = None) -> bool:
    """On a CPU already busy with other processes (1-minute load average at least the usable CPU count), let idle
    OpenMP threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``); True when it was set. Spinning threads
    whose partner is descheduled made scoring 2.5-4x slower with 2 threads on a shared 2-core CPU, while on a quiet
    one spinning was faster, so a quiet machine and a policy the environment already names are left alone. No
    number changes. OpenMP reads the variable when torch loads it: this only acts before ``import torch``."""
    if "OMP_WAIT_POLICY" in os.environ:
        return False
    try:
        load = os.getloadavg()[0] if load is None else load
        cpus = len(os.sched_getaffinity(0)) if cpus is None else cpus
    except (AttributeError, OSError):  # no load average or affinity on this platform
        return False
    if load < cpus:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True
