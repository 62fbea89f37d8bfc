"""How many CPUs the container may use, and how to split them into workers x engine threads.

os.cpu_count() reports the host's cores; a container limited by a CFS quota
(`docker run --cpus 2`, ECS/SageMaker task limits) or a cpuset gets fewer. Every
worker runs its own model copy with its own ONNX Runtime thread pool, so
workers x threads above the real CPU count only adds contention.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _quota_cpus(cgroup_root: Path) -> float | None:
    """CPUs granted by the CFS quota (cgroup v2, then v1), None when unlimited."""
    v2 = cgroup_root / "cpu.max"
    try:
        quota, period = v2.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((cgroup_root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((cgroup_root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def available_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may use: the cpuset, capped by the CFS quota (rounded, at least 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _quota_cpus(cgroup_root)
    if quota is not None:
        # 1.5 CPUs of quota run two single-threaded workers better than one.
        cpus = min(cpus, max(1, math.floor(quota + 0.5)))
    return max(1, cpus)


def worker_layout(cpus: int, workers: int | None = None, threads: int | None = None) -> tuple[int, int]:
    """(workers, engine threads per worker).

    Default: one single-threaded worker per CPU, the layout with the most requests
    per second (2 x 1 reached 0.90 to 0.94 of CPUs / single-thread time on 2 CPUs,
    docs/benchmarks.md, Serving). A request that finds every other worker idle runs
    on all the CPUs instead (``solo_threads``), so a lone request is as fast as with
    one worker of 2 threads. Either number may be set; the other is derived so that
    workers x threads = cpus.
    """
    if workers is None and threads is None:
        return cpus, 1
    if workers is None:
        return max(1, cpus // threads), threads
    if threads is None:
        return workers, max(1, cpus // workers)
    return workers, threads


def solo_threads(cpus: int, threads: int, threads_set: bool, solo: int | None = None) -> int:
    """Engine threads for a request that runs while every other worker is idle.

    ``solo`` when given (KENNEL_ORT_SOLO_THREADS); else all the CPUs, unless the
    engine threads were set explicitly (KENNEL_ORT_THREADS), which fixes them.
    Never fewer than ``threads``: equal means one engine configuration only.
    """
    if solo is None:
        solo = threads if threads_set else cpus
    return max(threads, solo)
