"""Where the model runs and in which precision, and how many CPU threads it may use.

CUDA when present (mixed precision, channels_last), else the CPU, with torch's
threads set from the CPUs the container really has: a cgroup CPU quota
(``docker run --cpus``, ECS, Kubernetes) and the affinity mask, not the host's
core count, which would oversubscribe a limited container.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from kennel_env import usable_cpus

from .failure import TrainingFailure

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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
