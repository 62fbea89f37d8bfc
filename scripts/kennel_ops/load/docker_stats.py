"""CPU and memory of one container, sampled from the Docker engine during a run.

The engine's stats stream (what `docker stats` shows) gives one sample a second
with cumulative CPU time and current memory, for cgroup v1 and v2 alike and for a
remote engine too. CPU is reported as docker does: 100 = one core busy.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class Sample:
    at: float  # time.monotonic() when the sample arrived
    cpu_percent: float | None  # over the interval since the previous sample; None for the first
    memory_bytes: int  # usage without the reclaimable page cache (docker's "MEM USAGE")


def memory_in_use(memory_stats: dict[str, Any]) -> int:
    """Docker's figure: usage minus inactive file cache (cgroup v1 or v2 key names)."""
    usage = int(memory_stats.get("usage", 0))
    detail = memory_stats.get("stats", {}) or {}
    for key in ("total_inactive_file", "inactive_file"):  # v1, then v2
        if key in detail and int(detail[key]) < usage:
            return usage - int(detail[key])
    return usage


def cpu_percent(stats: dict[str, Any]) -> float | None:
    """Container CPU over the stream interval: container CPU time / host CPU time x CPUs x 100."""
    cpu, pre = stats.get("cpu_stats", {}), stats.get("precpu_stats", {})
    try:
        container_delta = cpu["cpu_usage"]["total_usage"] - pre["cpu_usage"]["total_usage"]
        system_delta = cpu["system_cpu_usage"] - pre["system_cpu_usage"]
    except (KeyError, TypeError):
        return None
    cpus = cpu.get("online_cpus") or len(cpu["cpu_usage"].get("percpu_usage") or []) or 1
    if system_delta <= 0 or container_delta < 0:
        return None
    return container_delta / system_delta * cpus * 100.0


class ContainerSampler:
    """Samples a container in a background thread from start() to stop() (or its `with` block)."""

    def __init__(self, container_id: str, docker_client=None):
        if docker_client is None:
            import docker
            docker_client = docker.from_env()
        self._api = docker_client.api
        self.container_id = container_id
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None

    def start(self) -> "ContainerSampler":
        self._thread = threading.Thread(target=self._loop, name="kennel-load-stats", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[Sample]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)  # the stream yields once a second
        return self.samples

    def __enter__(self) -> "ContainerSampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _loop(self) -> None:
        try:
            for stats in self._api.stats(self.container_id, stream=True, decode=True):
                if self._stop.is_set():
                    break
                if not stats.get("memory_stats"):
                    break  # the container stopped
                self.samples.append(Sample(time.monotonic(), cpu_percent(stats),
                                           memory_in_use(stats["memory_stats"])))
        except Exception as exc:  # the engine went away or the container was removed
            self.error = f"{type(exc).__name__}: {exc}"

    def window(self, began: float, ended: float) -> list[Sample]:
        return [s for s in self.samples if began <= s.at <= ended]


def mean_cpu(samples: Sequence[Sample]) -> float | None:
    values = [s.cpu_percent for s in samples if s.cpu_percent is not None]
    return sum(values) / len(values) if values else None


def mean_memory_mib(samples: Sequence[Sample]) -> float | None:
    return sum(s.memory_bytes for s in samples) / len(samples) / 2**20 if samples else None
