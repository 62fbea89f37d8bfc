"""Command-line helpers for the container tests (imported by conftest and the tests)."""
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
