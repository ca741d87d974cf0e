"""When the process (or a sweep's job) started: ``seconds_loading`` counts from there."""

from __future__ import annotations

import os
import time

import xai_exp

_jobs_started = 0


def process_age() -> float:
    """Seconds since this process started: from ``/proc/self/stat`` on Linux (interpreter
    start-up included), elsewhere since ``xai_exp`` was imported (before Hydra, MLflow, torch)."""
    imported = time.perf_counter() - xai_exp.IMPORTED
    try:
        with open("/proc/self/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()  # the name may hold spaces
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime, since boot
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError, AttributeError):
        return imported
    return age if imported <= age < imported + 60 else imported  # an odd clock: the fallback


def job_started() -> float:
    """The `time.perf_counter()` at which this job started: the process's start for its first
    job, now for each later one (the jobs of a sweep in one process)."""
    global _jobs_started
    _jobs_started += 1
    now = time.perf_counter()
    return now - process_age() if _jobs_started == 1 else now
