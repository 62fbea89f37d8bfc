"""Start and stop the serving container for a load test.

The container is the compose service `serve` of the repository's compose.yaml
(same image, mounts and environment as `docker compose up serve`), started as a
one-off `docker compose run` on its own 127.0.0.1 port, so a `serve` the user
already runs on 8080 is left alone. Each configuration of a sweep gets a fresh
container with its own SAGEMAKER_MODEL_SERVER_WORKERS / KENNEL_ORT_THREADS.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

from kennel_ops.checkout import REPO
from kennel_ops.load.client import Target, wait_until_healthy
from kennel_ops.ports import free_port

SERVICE = "serve"
MODEL_DIR_VARIABLE = "KENNEL_MODEL_DIR"  # compose.yaml mounts it at /opt/ml/model
# kennel_serve.mms_toolkit.supervisor logs "ready: http://0.0.0.0:8080, 2 worker(s) x 1 engine thread(s) (2 for a request alone), ..."
READY_LINE = re.compile(r"ready: \S+ (?P<workers>\d+) worker\(s\) x (?P<threads>\d+) engine thread\(s\)"
                        r"(?: \((?P<solo>\d+) for a request alone\))?")


def parse_layout(log_text: str) -> dict[str, int] | None:
    """{"workers", "threads"[, "solo_threads"]} from the launcher's "ready:" line, None if absent."""
    for line in log_text.splitlines():
        match = READY_LINE.search(line)
        if match:
            layout = {"workers": int(match["workers"]), "threads": int(match["threads"])}
            if match["solo"]:
                layout["solo_threads"] = int(match["solo"])
            return layout
    return None


class ServingError(RuntimeError):
    """The serving container could not be started or did not become healthy."""


@dataclass
class ServingContainer:
    name: str
    container_id: str
    url: str  # http://127.0.0.1:PORT/invocations
    settings: dict[str, str]
    startup_s: float

    def logs(self, tail: int = 40) -> str:
        result = subprocess.run(["docker", "logs", "--tail", str(tail), self.name], capture_output=True,
                                text=True, timeout=60)
        return result.stdout + result.stderr

    def effective_layout(self) -> dict[str, int] | None:
        """The workers x engine threads the server chose, from its "ready:" log line (None if absent)."""
        return parse_layout(self.logs(tail=400))

    def stop(self, timeout_s: int = 30) -> None:
        subprocess.run(["docker", "stop", "--time", str(timeout_s), self.name], capture_output=True,
                       timeout=timeout_s + 60)
        subprocess.run(["docker", "rm", "--force", self.name], capture_output=True, timeout=60)


def compose_command(*args: str, compose_file: Path | None = None) -> list[str]:
    compose_file = compose_file or REPO / "compose.yaml"
    return ["docker", "compose", "--project-directory", str(compose_file.parent), "--file", str(compose_file), *args]


def start(settings: dict[str, str], model_dir: Path | None = None, compose_file: Path | None = None,
          startup_timeout_s: float = 240) -> ServingContainer:
    """A fresh `serve` container on a free 127.0.0.1 port, healthy (GET /ping 200) or ServingError."""
    port = free_port()
    name = f"kennel-loadtest-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ)
    if model_dir is not None:
        model_dir = Path(model_dir).resolve()
        if not model_dir.is_dir():
            raise ServingError(f"model directory {model_dir} does not exist (train first: make train)")
        env[MODEL_DIR_VARIABLE] = str(model_dir)
    args = ["run", "--detach", "--rm", "--no-deps", "--name", name, "--publish", f"127.0.0.1:{port}:8080"]
    for key, value in settings.items():
        args += ["--env", f"{key}={value}"]
    result = subprocess.run(compose_command(*args, SERVICE, compose_file=compose_file), capture_output=True,
                            text=True, env=env, timeout=600)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise ServingError(f"docker compose run {SERVICE} failed: {reason}")
    inspect = subprocess.run(["docker", "inspect", name], capture_output=True, text=True, timeout=60)
    container_id = json.loads(inspect.stdout)[0]["Id"] if inspect.returncode == 0 else name
    container = ServingContainer(name, container_id, f"http://127.0.0.1:{port}/invocations", dict(settings), 0.0)
    try:
        container.startup_s = wait_until_healthy(Target(container.url).with_path("/ping"), startup_timeout_s)
    except TimeoutError as exc:
        logs = container.logs()
        container.stop(timeout_s=5)
        last = (logs.strip().splitlines() or ["no log output"])[-1]
        raise ServingError(f"{exc}; last log line: {last}") from None
    return container
