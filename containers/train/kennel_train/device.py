"""Where the model runs and in which precision, and how many CPU threads it may use.

CUDA when present (mixed precision, channels_last), else the CPU, with torch's
threads set from the CPUs the container really has: a cgroup CPU quota
(``docker run --cpus``, ECS, Kubernetes) and the affinity mask, not the host's
core count, which would oversubscribe a limited container.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .failure import TrainingFailure

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup quota (v2 cpu.max, else v1 cfs quota/period); None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cpus(root: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may really use: the affinity mask, capped by the cgroup quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cpus = min(cpus, max(1, math.ceil(limit)))
    return max(1, cpus)


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls in hardware. Without them bf16 is emulated and slower than fp32."""
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # fp32, bf16 or fp16
    cpus: int
    threads: int

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self, enabled: bool = True):
        """Autocast to the training precision (a no-op context for fp32)."""
        if self.precision == "fp32" or not enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.precision])

    def describe(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.is_cuda else f"cpu, {self.threads} threads"
        return f"{self.device} ({name}), {self.precision}"


def select(device: str, precision: str, cuda_index: int = 0) -> Runtime:
    """Resolve the ``device`` and ``mixed_precision`` settings; set the CPU thread count."""
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise TrainingFailure("device=cuda but no CUDA GPU is visible (torch.cuda.is_available() is false): "
                              "use a GPU instance, or device=auto")
    use_cuda = cuda if device == "auto" else device == "cuda"
    if use_cuda:
        target = torch.device("cuda", cuda_index)
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    else:
        target = torch.device("cpu")
        if precision == "fp16":
            raise TrainingFailure("mixed_precision=fp16 needs a CUDA GPU; on the CPU use bf16 or fp32")
        if precision == "auto":
            precision = "bf16" if cpu_has_native_bf16() else "fp32"
    cpus = usable_cpus()
    threads = cpus
    torch.set_num_threads(threads)
    if use_cuda:
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(target, precision, cpus, threads)
