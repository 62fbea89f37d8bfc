"""What the container tests share: running commands, and models the images can read (imported by conftest and the tests)."""
from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "compose.yaml"


def run(args: list[str], timeout: float, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run a command, text output captured; on failure show its command line and output."""
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        pytest.fail(f"`{shlex.join(args)}` exited {result.returncode}\n"
                    f"--- stdout (tail)\n{result.stdout[-4000:]}\n--- stderr (tail)\n{result.stderr[-4000:]}",
                    pytrace=False)
    return result


def random_model(directory: Path, seed: int) -> Path:
    """A random-weight ResNet-18 with the original head (133 classes) in `directory`, readable by the
    images' unprivileged users: a real CNN, so the server, not the client, is the bottleneck."""
    from kennel_ops.bench.models import write_random_model
    write_random_model(directory, architecture="resnet18", num_classes=133, seed=seed)
    for path in directory.iterdir():
        path.chmod(0o644)
    directory.chmod(0o755)
    return directory
