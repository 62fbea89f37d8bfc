"""Checkpoints under /opt/ml/checkpoints: written atomically, checked before use, resumed from at start.

SageMaker syncs that folder with S3 during a managed-spot job and copies it
back in when the job restarts, so a restart resumes where the last checkpoint
left off. Names say how far training got:

    epoch-0003.pt             epochs 1-3 complete (training and validation)
    epoch-0004-step-000120.pt stopped (SIGTERM) in epoch 4 after step 120

Each ``.pt`` has a ``.json`` beside it with its sha256 and progress. A file is
written to a temporary name, fsynced and renamed into place, so a reader sees
a whole checkpoint or none. At start the newest checkpoint whose checksum and
load succeed is used; a corrupt or half-synced newest one falls back to the
previous. After each epoch's checkpoint, older ones beyond ``keep`` and every
mid-epoch one are deleted.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import atomic
from .failure import TrainingFailure

log = logging.getLogger("kennel_train")

FORMAT = 1
_NAME = re.compile(r"^epoch-(\d{4,})(?:-step-(\d{6,}))?\.pt$")


@dataclass(frozen=True)
class Position:
    """How far a checkpoint got: ``epoch`` complete, or stopped in ``epoch`` after ``step``."""

    epoch: int
    step: int | None  # None: the epoch is complete

    @property
    def order(self) -> tuple[int, int, int]:
        return (self.epoch, 1 if self.step is None else 0, self.step or 0)

    @property
    def file_name(self) -> str:
        return f"epoch-{self.epoch:04d}.pt" if self.step is None else f"epoch-{self.epoch:04d}-step-{self.step:06d}.pt"

    def describe(self) -> str:
        return f"epoch {self.epoch} complete" if self.step is None else f"epoch {self.epoch} step {self.step}"


def _parse(name: str) -> Position | None:
    match = _NAME.match(name)
    if not match:
        return None
    return Position(int(match.group(1)), int(match.group(2)) if match.group(2) is not None else None)


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def cpu_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's tensors on the CPU, in the standard (contiguous) layout whatever the training layout."""
    return {key: value.detach().to("cpu").contiguous() for key, value in module.state_dict().items()}


def save(directory: Path, progress: Position, state: dict[str, Any]) -> Path:
    """Write ``state`` as the checkpoint for ``progress``; return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    data = buffer.getvalue()
    path = directory / progress.file_name
    atomic.write_bytes(path, data, durable=True)
    meta = {"format": FORMAT, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
            "epoch": progress.epoch, "step": progress.step, "written": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                       time.gmtime())}
    atomic.write_text(_sidecar(path), json.dumps(meta, indent=2) + "\n", durable=True)
    return path


def candidates(directory: Path) -> list[tuple[Position, Path]]:
    """Checkpoint files, newest first."""
    if not directory.is_dir():
        return []
    found = [(progress, path) for path in directory.iterdir() if (progress := _parse(path.name)) is not None]
    return sorted(found, key=lambda item: item[0].order, reverse=True)


class Unusable(Exception):
    """The file is not a whole, intact checkpoint."""


def read(path: Path) -> dict[str, Any]:
    """Load a checkpoint after checking it against its sidecar; Unusable says why not."""
    try:
        meta = json.loads(_sidecar(path).read_text())
        expected = meta["sha256"]
    except FileNotFoundError:
        raise Unusable(f"{_sidecar(path).name} is missing (written or synced only in part)") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise Unusable(f"{_sidecar(path).name} is unreadable: {error}") from None
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != expected:
        raise Unusable(f"checksum mismatch ({len(data)} bytes, sidecar says {meta.get('bytes')})")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:
        raise Unusable(f"cannot be loaded: {type(error).__name__}: {' '.join(str(error).split())[:200]}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise Unusable(f"not a kennel checkpoint of format {FORMAT}")
    return state


def latest(directory: Path, identity: dict[str, Any]) -> tuple[Position, Path, dict[str, Any]] | None:
    """The newest usable checkpoint, or None. A checkpoint of a different model is an error, not skipped:
    resuming it would be wrong and deleting it would lose work."""
    for progress, path in candidates(directory):
        try:
            state = read(path)
        except Unusable as error:
            log.warning("checkpoint %s is unusable (%s); trying the previous one", path.name, error)
            continue
        if state.get("identity") != identity:
            raise TrainingFailure(
                f"checkpoint {path} belongs to a different run ({_difference(state.get('identity'), identity)}): "
                f"start with an empty checkpoint folder, or use that run's settings")
        return progress, path, state
    return None


def _difference(found: Any, expected: dict[str, Any]) -> str:
    if not isinstance(found, dict):
        return "no model description"
    diffs = [f"{key} {found.get(key)!r} there, {value!r} here" for key, value in expected.items()
             if found.get(key) != value]
    for i, diff in enumerate(diffs):
        if diff.startswith("class_names"):
            diffs[i] = "different class names"
    return "; ".join(diffs[:3]) or "unknown difference"


def prune(directory: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete-epoch checkpoints; drop mid-epoch ones (a newer epoch supersedes them)."""
    complete = [(progress, path) for progress, path in candidates(directory) if progress.step is None]
    partial = [(progress, path) for progress, path in candidates(directory) if progress.step is not None]
    newest = complete[0][0].order if complete else (0, 0, 0)
    for _progress, path in complete[keep:] + [item for item in partial if item[0].order < newest]:
        for victim in (path, _sidecar(path)):
            try:
                victim.unlink()
            except FileNotFoundError:
                pass
