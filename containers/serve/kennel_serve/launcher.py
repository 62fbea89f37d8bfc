"""`serve`: check the model, run multi-model-server, and stop it cleanly.

1. Read the settings; reset the state dir. MMS's temp dir is inside it, so a restarted
   container never finds MMS's old /tmp/.model_server.pid: MMS refuses to start while
   the pid in it is alive, and in a restarted container it often is, as another process.
2. Install code/requirements.txt if the model brings one.
3. Load the model exactly as the workers will (same handlers, user code included)
   and run one warm-up inference. Any problem: ONE line on stderr, exit 1, before
   a port is bound, instead of an endpoint that is InService and fails every request.
4. Write MMS's configuration (workers, timeouts, payload cap, JVM flags with container
   support, management API on a Unix socket only, our /ping and
   /execution-parameters plugin) and start MMS in its own process group.
5. Supervise: a worker that cannot load its model, or MMS exiting, ends the
   container with that reason. On SIGTERM/SIGINT: /ping turns 503, in-flight requests
   finish (at most KENNEL_DRAIN_TIMEOUT_S), then the whole MMS process group is
   stopped, workers included; exit 0 well within SageMaker's 30 s.
"""
from __future__ import annotations

import gc
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

from kennel_serve import activity
from kennel_serve.settings import MIB, ServeSettings, SettingsError

log = logging.getLogger("kennel_serve")

HANDLER_SERVICE = "kennel_serve.handler_service"
PLUGIN_JAR = "kennel-mms-plugin.jar"
LOG_CONFIG = Path(__file__).with_name("etc") / "log4j2.xml"
MODEL_NAME = "model"
QUIET_PERIOD_S = 0.5  # all workers idle this long = nothing queued in the JVM either
STOP_GRACE_S = 3.0  # per signal; with the drain timeout (<= 25 s) well inside SageMaker's 30 s
# JVM flags for MMS's frontend. UseContainerSupport: size the heap from the container's
# memory limit, not the host's (the toolkit passes -XX:-UseContainerSupport); the heap only
# holds request bodies in flight. TieredStopAtLevel=1 (C1 only) and the serial collector:
# no C2 compiler or parallel GC threads competing with the model for the CPUs at start;
# the JVM binds its port in about half the time on 2 cores (docs/benchmarks.md), and its
# per-request work is microseconds next to a CNN's milliseconds. Xmn16m: a small young
# generation, reused after each (millisecond) collection; left to size itself from the
# host's memory, the JVM kept touching new heap pages under load, and the container's
# memory rose for minutes (+37 MiB in 70 s at 14 requests/s) before it levelled off.
DEFAULT_VMARGS = ("-XX:+UseContainerSupport -XX:MaxRAMPercentage=25 -XX:+ExitOnOutOfMemoryError "
                  "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC -Xmn16m")


class ServeError(Exception):
    """A reason not to serve, printed as the one line `serve` ends with."""


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if text else type(exc).__name__


class StopRequest:
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


def reset_state_dir(state_dir: Path) -> None:
    """An empty state dir. MMS's temp dir (its pid file, worker sockets) lives inside it."""
    shutil.rmtree(state_dir, ignore_errors=True)
    (state_dir / "tmp").mkdir(parents=True, exist_ok=True)


def install_requirements(code_dir: Path, target: Path) -> Path | None:
    """pip install code/requirements.txt into the state dir (the image's venv is read-only)."""
    requirements = code_dir / "requirements.txt"
    if not requirements.is_file():
        return None
    log.warning("installing %s", requirements)
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-cache-dir",
                             "--disable-pip-version-check", "--target", str(target), "-r", str(requirements)])
    if result.returncode != 0:
        raise ServeError(f"pip could not install {requirements} (exit {result.returncode}, see above)")
    return target


def check_model(settings: ServeSettings) -> None:
    """Load the model through the serving handlers and warm it up, or raise ServeError."""
    from kennel_serve.handler import KennelInferenceHandler  # imports ONNX Runtime: after the settings check
    from kennel_serve.transformer import KennelTransformer

    if not settings.model_dir.is_dir():
        raise ServeError(f"model directory {settings.model_dir} does not exist: extract model.tar.gz there "
                         f"(SageMaker does) or mount the folder training wrote")
    transformer = KennelTransformer(KennelInferenceHandler(settings), settings)
    try:
        transformer.validate_and_initialize(model_dir=str(settings.model_dir))
    except Exception as exc:
        raise ServeError(f"cannot serve {settings.model_dir}: {one_line(exc)}") from None
    del transformer
    gc.collect()


def mms_properties(settings: ServeSettings) -> str:
    payload = settings.max_payload_bytes
    properties = {
        # Environment variables MMS_<PROPERTY> may still override any line (operators' escape hatch).
        "enable_envvars_config": "true",
        "decode_input_request": "false",
        "default_service_handler": HANDLER_SERVICE,
        "default_workers_per_model": settings.workers,
        # Seconds. (MMS reads default_response_timeout, which the toolkit writes, as MINUTES.)
        "default_response_timeout_seconds": settings.model_server_timeout_s,
        "inference_address": f"http://{settings.bind_address}:{settings.port}",
        # The management API (register/scale/delete models) answers on a Unix socket only,
        # never on the port clients reach.
        "management_address": f"unix:{settings.state_dir / 'management.sock'}",
        "use_native_io": "true",
        # Bodies up to twice the limit reach the handler, which refuses them with a JSON 413;
        # beyond that Netty's own bare 413 answers before anything is buffered.
        "max_request_size": max(2 * payload, payload + MIB),
        "max_response_size": 16 * MIB,
        "vmargs": settings.vmargs or DEFAULT_VMARGS,
        "plugins_path": settings.mms_plugins,
        # The server process imports once; each forked worker loads its own model (handler_service).
        "preload_model": "true",
    }
    return "".join(f"{key}={value}\n" for key, value in properties.items())


def mms_environment(settings: ServeSettings, python_paths: list[Path]) -> dict[str, str]:
    env = dict(os.environ)
    tmp = str(settings.state_dir / "tmp")
    env.update({
        "KENNEL_SERVE_STATE_DIR": str(settings.state_dir),
        "KENNEL_EXECUTION_PARAMETERS": settings.execution_parameters(),
        # The resolved layout, so every worker builds the same session as the check did.
        "SAGEMAKER_MODEL_SERVER_WORKERS": str(settings.workers),
        "KENNEL_ORT_THREADS": str(settings.ort_threads),
        "KENNEL_ORT_SOLO_THREADS": str(settings.solo_threads),
        # MMS's pid file, worker sockets and the JVM's temp files: inside the state dir.
        "TMPDIR": tmp,
        "TEMP": tmp,
    })
    paths = [str(p) for p in python_paths] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def start_mms(settings: ServeSettings, env: dict[str, str]) -> subprocess.Popen:
    config = settings.state_dir / "mms.properties"
    config.write_text(mms_properties(settings))
    cli = shutil.which("multi-model-server", path=os.pathsep.join([os.path.dirname(sys.executable),
                                                                   os.environ.get("PATH", "")]))
    if cli is None:
        raise ServeError("multi-model-server is not installed in this environment")
    command = [cli, "--start", "--foreground", "--mms-config", str(config), "--model-store", "/",
               "--models", f"{MODEL_NAME}={settings.model_dir.resolve()}", "--log-config", str(LOG_CONFIG)]
    # Own process group (same session): the launcher stops the CLI, the JVM and every Python
    # worker together.
    return subprocess.Popen(command, env=env, cwd=str(settings.state_dir), process_group=0)


def ping(settings: ServeSettings) -> bool:
    host = "127.0.0.1" if settings.bind_address in ("0.0.0.0", "::", "") else settings.bind_address
    try:
        with urllib.request.urlopen(f"http://{host}:{settings.port}/ping", timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def drain(settings: ServeSettings) -> None:
    """Fail /ping, then wait until no worker has had a request for QUIET_PERIOD_S (or the timeout)."""
    (settings.state_dir / activity.DRAINING_FILE).touch()
    deadline = time.monotonic() + settings.drain_timeout_s
    quiet_since = None
    while time.monotonic() < deadline:
        if activity.busy_workers(settings.state_dir):
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= QUIET_PERIOD_S:
            return
        time.sleep(0.05)
    log.warning("drain timeout (%g s): stopping with requests still in flight", settings.drain_timeout_s)


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


def supervise(process: subprocess.Popen, settings: ServeSettings, stop: StopRequest, started: float) -> int:
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


def main() -> int:
    started = time.monotonic()
    logging.basicConfig(level=logging.WARNING, format="kennel-serve: %(message)s", stream=sys.stderr)
    stop = StopRequest()
    try:
        settings = ServeSettings.from_env(os.environ)
        if settings.mms_plugins is None or not (settings.mms_plugins / PLUGIN_JAR).is_file():
            raise ServeError(f"KENNEL_MMS_PLUGINS={settings.mms_plugins or ''} holds no {PLUGIN_JAR} "
                             f"(build it with containers/serve/mms-plugin/build.sh)")
        reset_state_dir(settings.state_dir)
        code_dir = settings.model_dir / "code"
        python_paths = [path for path in (code_dir if code_dir.is_dir() else None,
                                          install_requirements(code_dir, settings.state_dir / "packages"))
                        if path is not None]
        sys.path[:0] = [str(path) for path in python_paths]
        check_model(settings)
    except (SettingsError, ServeError) as exc:
        print(f"kennel-serve: {exc}", file=sys.stderr, flush=True)
        return 1
    if stop.requested:
        return 0
    log.warning("model %s checked and warmed up in %.1f s; starting multi-model-server", settings.model_dir,
                time.monotonic() - started)
    process = start_mms(settings, mms_environment(settings, python_paths))
    try:
        return supervise(process, settings, stop, started)
    finally:
        if process.poll() is None:
            stop_mms(process)
