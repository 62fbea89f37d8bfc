"""Replace a file in one step: readers (serving, S3 sync, a person) see the old file or the new one, never half.

Files get the process umask's permissions (0644 under the usual 022), not the
0600 of tempfile: the serving image reads the model as another user.
"""
from __future__ import annotations

import os
from pathlib import Path


def write_bytes(path: Path, data: bytes, durable: bool = False) -> None:
    """Write ``data`` to a temporary name beside ``path`` and rename it into place.

    ``durable``: fsync the file and the folder too, so the new file survives a
    crash or a SIGKILL right after (checkpoints).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def write_text(path: Path, text: str, durable: bool = False) -> None:
    write_bytes(path, text.encode("utf-8"), durable)
