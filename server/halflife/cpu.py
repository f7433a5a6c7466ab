"""What this process may run on."""

from __future__ import annotations

import os


def physical_cores() -> int:
    """Physical cores this process may run on (hyperthreads share execution units,
    so more intra-op threads than this only add contention)."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cores = set()
    try:
        physical_id = "0"
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    physical_id = value.strip()
                elif key == "core id":
                    cores.add((physical_id, value.strip()))
    except OSError:
        pass
    return max(1, min(allowed, len(cores) or allowed))
