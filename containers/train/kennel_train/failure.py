"""Failure reasons: one specific line per expected failure, written to /opt/ml/output/failure.

SageMaker shows the first 1024 characters of that file as the job's
FailureReason. Code raises :class:`TrainingFailure` with a reason a person can
act on; :func:`reason_for` turns every other exception into one line (out of
memory gets advice, anything unexpected becomes "internal error: <type>: <msg>"
while its traceback goes to the log only).
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

import torch

from . import atomic

FAILURE_LIMIT = 1024  # characters SageMaker keeps as FailureReason


class TrainingFailure(Exception):
    """An expected failure; ``str(error)`` is the reason, written as is to the failure file."""


class Stopped(TrainingFailure):
    """SIGTERM or SIGINT ended the run after it saved what it could (the reason says where)."""

    def __init__(self, reason: str, signal_number: int):
        super().__init__(reason)
        self.signal_number = signal_number


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    # A DataLoader worker killed by the kernel's OOM killer surfaces as a RuntimeError.
    return isinstance(error, RuntimeError) and "killed by signal: Killed" in str(error)


def is_shared_memory_exhausted(error: BaseException) -> bool:
    # Workers hand batches over in /dev/shm; Docker's 64 MB default is too small for
    # image batches, and a worker then dies of SIGBUS or fails to write its segment.
    text = str(error)
    return isinstance(error, RuntimeError) and ("killed by signal: Bus error" in text
                                                or ("/torch_" in text and "No space left on device" in text))


def reason_for(error: BaseException, context: str = "") -> str:
    """The failure reason for ``error``; ``context`` describes the run (batch size, device) for advice."""
    if isinstance(error, TrainingFailure):
        return one_line(str(error))
    where = f" ({context})" if context else ""
    if is_out_of_memory(error):
        return one_line(f"out of memory{where}: lower batch_size (or workers), or use an instance with more "
                        f"memory; {type(error).__name__}: {error}")
    if is_shared_memory_exhausted(error):
        return one_line(f"shared memory (/dev/shm) is too small for the data loader workers{where}: run the "
                        f"container with a larger --shm-size (compose.yaml uses 2gb), or set workers=0; {error}")
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return one_line(f"no space left on the device writing {error.filename or 'a file'}: free space, or give the "
                        "job more storage (SageMaker: VolumeSizeInGB)")
    if isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return one_line(f"cannot write {error.filename or 'a file'}: {error.strerror}; the output folders must be "
                        "writable by the user the container runs as")
    return one_line(f"internal error: {type(error).__name__}: {error}")


def one_line(text: str) -> str:
    """Collapse whitespace (no multi-line tracebacks in a reason) and keep it within the limit."""
    text = " ".join(str(text).split())
    return text if len(text) <= FAILURE_LIMIT else text[: FAILURE_LIMIT - 3] + "..."


def write_failure(path: str | os.PathLike[str], reason: str) -> None:
    """Write the reason atomically (a reader never sees half of it)."""
    atomic.write_text(Path(path), one_line(reason))
