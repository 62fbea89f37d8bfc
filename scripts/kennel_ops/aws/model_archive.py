"""A kennel model folder packed as NAME.tar.gz for a multi-model endpoint: the same model
gives the same bytes.

Entries are sorted by path, with mtime FIXED_MTIME, owner 0:0 without user or group
names, mode 0644 (0755 for folders and executable files); the gzip header carries
no file name and no time. model.pth is left out: serving reads model.onnx (and
model.int8.onnx), never the PyTorch weights, which would only lengthen every
download. The digest that identifies an archive is that of the uncompressed tar:
deflate's output may differ between zlib builds, the tar's does not.
"""
from __future__ import annotations

import gzip
import hashlib
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

from kennel_artifact import WEIGHTS_FILE

FIXED_MTIME = 315532800  # 1980-01-01 00:00 UTC, the time the Lambda zip's entries carry too
LEFT_OUT = frozenset({WEIGHTS_FILE})  # at the folder's top level
COMPRESS_LEVEL = 6  # zlib's default: ONNX weights barely compress, so more effort buys little


@dataclass(frozen=True)
class Archive:
    path: Path
    size: int  # bytes of the .tar.gz
    tar_sha256: str  # of the uncompressed tar
    members: tuple[str, ...]


class _Hashing:
    """A write-only stream that hashes what passes through it on the way to another."""

    def __init__(self, out) -> None:
        self.out, self.digest = out, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.out.write(data)


def entries(model_dir: Path) -> list[Path]:
    """The paths to pack, sorted by their names in the archive; ValueError for a link or a special file."""
    found = []
    for path in model_dir.rglob("*"):
        relative = path.relative_to(model_dir)
        if relative.as_posix() in LEFT_OUT:
            continue
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise ValueError(f"{path} is a link or a special file: a model folder holds plain files only")
        found.append(path)
    return sorted(found, key=lambda path: path.relative_to(model_dir).as_posix())


def tar_info(path: Path, name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime, info.uid, info.gid, info.uname, info.gname = FIXED_MTIME, 0, 0, "", ""
    if path.is_dir():
        info.type, info.mode = tarfile.DIRTYPE, 0o755
    else:
        info.size = path.stat().st_size
        info.mode = 0o755 if path.stat().st_mode & stat.S_IXUSR else 0o644
    return info


def pack(model_dir: Path, output: Path) -> Archive:
    """Write model_dir's files (but model.pth) to output as a reproducible .tar.gz."""
    paths = entries(model_dir)
    with open(output, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                                                  compresslevel=COMPRESS_LEVEL) as compressed:
        hashing = _Hashing(compressed)
        # Stream mode ("w|") only ever writes forward, so every byte passes the digest.
        with tarfile.open(fileobj=hashing, mode="w|", format=tarfile.PAX_FORMAT) as archive:
            for path in paths:
                info = tar_info(path, path.relative_to(model_dir).as_posix())
                if info.isdir():
                    archive.addfile(info)
                else:
                    with open(path, "rb") as source:
                        archive.addfile(info, source)
    members = tuple(path.relative_to(model_dir).as_posix() for path in paths)
    return Archive(output, output.stat().st_size, hashing.digest.hexdigest(), members)
