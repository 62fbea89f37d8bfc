"""Running MMS: start it, watch it, stop all of it.

Works around (sagemaker-inference 1.10.1, multi-model-server 1.1.11):

- The toolkit's start_model_server starts MMS in the background and then looks for
  the JVM among all processes by its command line (psutil), for up to a startup
  timeout; on SIGTERM it signals the JVM alone, and MMS's Python workers are left to
  notice. Here MMS runs in the foreground in its own process group, and stop_mms
  signals the group: the CLI, the JVM and every Python worker stop together.
- MMS replaces a worker whose model failed to load and tries again, forever, while
  the endpoint answers 500s. supervise ends serve with the worker's one line
  (activity.read_failure) instead.
- MMS exiting leaves nothing to tell a container orchestrator why; supervise ends
  serve with its exit code.

Proved by: tests/contract/test_serve_lifecycle.py::test_sigterm_drains_in_flight_requests_and_exits_within_30_s,
tests/contract/test_serve_lifecycle.py::test_a_worker_that_cannot_load_the_model_stops_serve,
tests/contract/test_serve_lifecycle.py::test_restart_finds_no_stale_state.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from kennel_serve.mms_toolkit import activity
from kennel_serve.mms_toolkit.drain import drain
from kennel_serve.mms_toolkit.mms_config import LOG_CONFIG, MMS_MODEL_NAME
from kennel_serve.settings import ServeSettings

log = logging.getLogger("kennel_serve")

STOP_GRACE_S = 3.0  # per signal; with the drain timeout (<= 25 s) well inside SageMaker's 30 s


class StopSignals:
    """SIGTERM (SageMaker, docker stop) and SIGINT (Ctrl-C) ask for a drained stop."""

    def __init__(self) -> None:
        self.event = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.event.set()

    @property
    def requested(self) -> bool:
        return self.event.is_set()


def find_mms_cli() -> str | None:
    """multi-model-server next to this interpreter (the image's venv), else on PATH."""
    return shutil.which("multi-model-server", path=os.pathsep.join([os.path.dirname(sys.executable),
                                                                    os.environ.get("PATH", "")]))


def start_mms(cli: str, properties: Path, model_dir: Path, env: dict[str, str], state_dir: Path) -> subprocess.Popen:
    command = [cli, "--start", "--foreground", "--mms-config", str(properties), "--model-store", "/",
               "--models", f"{MMS_MODEL_NAME}={model_dir.resolve()}", "--log-config", str(LOG_CONFIG)]
    # Own process group (same session): the launcher stops the CLI, the JVM and every Python
    # worker together.
    return subprocess.Popen(command, env=env, cwd=str(state_dir), process_group=0)


def ping(settings: ServeSettings) -> bool:
    host = "127.0.0.1" if settings.bind_address in ("0.0.0.0", "::", "") else settings.bind_address
    try:
        with urllib.request.urlopen(f"http://{host}:{settings.port}/ping", timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def stop_mms(process: subprocess.Popen) -> None:
    """SIGTERM the whole MMS process group (CLI, JVM, Python workers), SIGKILL what is left."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline:
            process.poll()  # reap the CLI; orphaned members are reaped by PID 1
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.02)


def supervise(process: subprocess.Popen, settings: ServeSettings, stop: StopSignals, started: float) -> int:
    """Until a stop request, a failed worker or MMS exiting; the exit code serve ends with."""
    ready = False
    while True:
        if stop.requested:
            log.warning("stop requested: draining in-flight requests")
            drain(settings)
            stop_mms(process)
            log.warning("stopped")
            return 0
        failure = activity.read_failure(settings.state_dir)
        if failure:
            stop_mms(process)
            print(f"kennel-serve: {failure}", file=sys.stderr, flush=True)
            return 1
        code = process.poll()
        if code is not None:
            stop_mms(process)
            print(f"kennel-serve: multi-model-server exited unexpectedly (exit {code}); its log is above",
                  file=sys.stderr, flush=True)
            return 1
        if not ready and ping(settings):
            ready = True
            log.warning("ready: http://%s:%d, %d worker(s) x %d engine thread(s) (%d for a request alone), "
                        "%.1f s after start", settings.bind_address, settings.port, settings.workers,
                        settings.ort_threads, settings.solo_threads, time.monotonic() - started)
        stop.event.wait(0.25 if ready else 0.1)
