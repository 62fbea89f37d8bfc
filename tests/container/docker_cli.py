"""What the container tests share: running commands, and models the images can read (imported by conftest and the tests)."""
from __future__ import annotations

import json
import shlex
import subprocess
import textwrap
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


# Run inside a serving container: MMS's Python model workers, i.e. the processes running
# model_service_worker.py that were forked by another one (MMS starts one such parent,
# which forks a worker per backend connection), with their resident and peak memory.
_WORKERS_SCRIPT = textwrap.dedent("""
    import json, os
    def is_worker(pid):
        try:
            return any(a.endswith(b"model_service_worker.py")
                       for a in open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0"))
        except OSError:
            return False
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            parent = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]
            if is_worker(pid) and is_worker(parent):
                fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
                found[pid] = [int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])]
        except OSError:
            continue
    print(json.dumps(found))
""")


def model_workers(container: str) -> dict[int, tuple[int, int]]:
    """{pid: (VmRSS KiB, VmHWM KiB)} of the serving container's model workers."""
    result = run(["docker", "exec", container, "python", "-c", _WORKERS_SCRIPT], timeout=60)
    return {int(pid): tuple(values) for pid, values in json.loads(result.stdout).items()}
