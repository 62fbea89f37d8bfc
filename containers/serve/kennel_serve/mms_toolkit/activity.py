"""What MMS's Python workers tell the launcher, through small files in the state dir.

Works around (multi-model-server 1.1.11, sagemaker-inference 1.10.1):

- No drain. The toolkit forwards SIGTERM straight to MMS (model_server._add_sigterm_handler),
  which stops with requests in flight cut off, and nothing in MMS says which workers are busy.
  workers/<pid> holds "1" while that worker handles a request, "0" when idle; on SIGTERM
  the launcher (drain.py) waits until every live worker has been idle for a moment (the
  JVM hands a queued request to an idle worker within milliseconds) before it stops MMS.
  The same flags tell a worker whether it runs alone (engine.KennelModel's solo session).
- A model that fails to load is served anyway. MMS's loader (model_loader.MmsModelLoader.load)
  logs the exception from initialize and reports the worker as loaded. A worker whose model
  failed writes one line to "failed"; the launcher then stops with that line instead of
  MMS calling initialize again on every request.
- MMS's /ping answers 200 while the server shuts down. "draining" is created by the launcher
  on SIGTERM and read by the /ping plugin (mms-plugin/PingEndpoint.java), which then says 503.

Writes are best effort: a request never fails because its busy flag could not be set.

Proved by: tests/contract/test_serve_lifecycle.py::test_sigterm_drains_in_flight_requests_and_exits_within_30_s,
tests/contract/test_serve_lifecycle.py::test_a_worker_that_cannot_load_the_model_stops_serve,
tests/contract/test_serve_engine.py::test_the_default_handler_asks_the_other_workers_busy_flags,
tests/unit/test_serve_activity.py.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

WORKERS_DIR = "workers"
FAILURE_FILE = "failed"
DRAINING_FILE = "draining"  # read by the MMS /ping plugin (mms-plugin/PingEndpoint.java)


class WorkerActivity:
    def __init__(self, state_dir: Path):
        self._dir = Path(state_dir) / WORKERS_DIR
        self._fd: int | None = None
        self._pid: int | None = None

    def _descriptor(self) -> int | None:
        if self._pid != os.getpid():  # MMS forks workers: each keeps its own file
            self._pid, self._fd = os.getpid(), None
            try:
                self._dir.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self._dir / str(self._pid), os.O_RDWR | os.O_CREAT, 0o644)
            except OSError:
                self._fd = None
        return self._fd

    def _set(self, flag: bytes) -> None:
        fd = self._descriptor()
        if fd is not None:
            with contextlib.suppress(OSError):
                os.pwrite(fd, flag, 0)

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        self._set(b"1")
        try:
            yield
        finally:
            self._set(b"0")


def busy_workers(state_dir: Path) -> int:
    """How many live workers are handling a request right now."""
    busy = 0
    for path in (Path(state_dir) / WORKERS_DIR).glob("*"):
        try:
            pid = int(path.name)
            os.kill(pid, 0)
            busy += path.read_bytes()[:1] == b"1"
        except (ValueError, OSError):
            continue  # not a worker file, or its worker is gone
    return busy


def report_failure(state_dir: Path, line: str) -> None:
    path = Path(state_dir) / FAILURE_FILE
    with contextlib.suppress(OSError):
        tmp = path.with_name(f".{FAILURE_FILE}.{os.getpid()}")
        tmp.write_text(line.strip() + "\n")
        os.replace(tmp, path)


def read_failure(state_dir: Path) -> str | None:
    try:
        return (Path(state_dir) / FAILURE_FILE).read_text().strip() or None
    except OSError:
        return None
