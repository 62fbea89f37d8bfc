"""What both images read from their surroundings: environment values and the CPUs they may use.

One parser for a true/false value, so a word that switches a training setting
switches a serving one too; one CPU count, so both images size their threads
from the same reading of the container's limits. Standard library only: both
images import it beside kennel_artifact.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def parse_bool(value: object) -> bool:
    """True/false from a bool, 1/0, or one of TRUE_WORDS/FALSE_WORDS in any case; else ValueError."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (str, int)):
        word = str(value).strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    raise ValueError(f"expected true or false ({'/'.join(TRUE_WORDS)} or {'/'.join(FALSE_WORDS)})")


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs the cgroup's CFS quota grants (v2 cpu.max, else v1 cfs quota/period); None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def usable_cpus(root: Path = CGROUP_ROOT) -> int:
    """The CPUs this process may really use: its affinity mask (the cpuset), capped by the
    quota rounded to the nearest whole CPU, at least 1.

    os.cpu_count() is the host's: a container limited by `docker run --cpus`, ECS or
    SageMaker gets fewer, and threads beyond them only contend. Rounded, not raised:
    a quota of 1.5 runs two threads better than one, one of 1.2 runs one better than two.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(root)
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota + 0.5)))
    return max(1, cpus)
