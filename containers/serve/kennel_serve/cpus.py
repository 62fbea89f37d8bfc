"""How to split the container's CPUs (kennel_env.usable_cpus) into workers x engine threads.

Every worker runs its own model copy with its own ONNX Runtime thread pool, so
workers x threads above the real CPU count only adds contention.
"""
from __future__ import annotations


def worker_layout(cpus: int, workers: int | None = None, threads: int | None = None) -> tuple[int, int]:
    """(workers, engine threads per worker).

    Default: one single-threaded worker per CPU, the layout with the most requests
    per second (docs/benchmarks.md, Serving). A request that finds every other worker idle runs
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
