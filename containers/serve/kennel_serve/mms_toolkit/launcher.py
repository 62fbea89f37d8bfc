"""`serve`: check the model, run multi-model-server, and stop it cleanly.

1. Read the settings; reset the state dir.
2. Install code/requirements.txt if the model brings one.
3. Load the model exactly as the workers will (same handlers, user code included)
   and run one warm-up inference.
   On a multi-model endpoint (SAGEMAKER_MULTI_MODEL=true) there is no model yet:
   MMS serves the multi-model host (kennel_serve.multi_model) instead.
4. Serve GET /metrics on KENNEL_METRICS_PORT from a thread (kennel_serve.metrics_endpoint).
5. Write MMS's configuration (mms_config.py) and start MMS in its own process group.
6. Supervise it (supervisor.py); on SIGTERM/SIGINT drain (drain.py), then stop it,
   exit 0 well within SageMaker's 30 s.

Works around (sagemaker-inference 1.10.1, multi-model-server 1.1.11), in place of the
toolkit's start_model_server:

- MMS refuses to start while the pid in its /tmp/.model_server.pid is alive, and in a
  restarted container it often is, as another process. MMS's temp dir is inside the
  state dir here, and every start empties it (reset_state_dir).
- The toolkit pip-installs code/requirements.txt into the interpreter's own
  environment, which is read-only to the image's unprivileged user. Here it goes to
  the state dir (--target), put on the workers' PYTHONPATH.
- With a model that cannot load, MMS still binds its port and the endpoint goes
  InService, then fails every request. Here any problem is ONE line on stderr and
  exit 1, before a port is bound (check_model_serves).

Proved by: tests/contract/test_serve_lifecycle.py::test_restart_finds_no_stale_state,
tests/unit/test_serve_launcher.py::test_reset_state_dir_removes_what_a_killed_server_left,
tests/contract/test_serve_user_code.py::test_user_input_and_output_fn_with_the_default_model_and_predict_fn,
tests/contract/test_serve_lifecycle.py::test_an_invalid_model_ends_serve_with_one_line,
tests/contract/test_serve_lifecycle.py::test_missing_model_or_bad_settings_end_serve_with_one_line,
tests/contract/test_serve_lifecycle.py::test_a_failing_user_model_fn_ends_serve_with_one_line.
"""
from __future__ import annotations

import gc
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from kennel_serve.mms_toolkit import mms_config, multi_model_routes, supervisor
from kennel_serve.settings import ServeSettings, SettingsError

log = logging.getLogger("kennel_serve")


class ServeError(Exception):
    """A reason not to serve, printed as the one line `serve` ends with."""


def exception_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if text else type(exc).__name__


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


def check_model_serves(settings: ServeSettings) -> None:
    """Load the model through the serving handlers and warm it up, or raise ServeError."""
    # Both import ONNX Runtime: only after the settings were checked.
    from kennel_serve.mms_toolkit.transformer import KennelTransformer
    from kennel_serve.request_path import KennelInferenceHandler

    if not settings.model_dir.is_dir():
        raise ServeError(f"model directory {settings.model_dir} does not exist: extract model.tar.gz there "
                         f"(SageMaker does) or mount the folder training wrote")
    transformer = KennelTransformer(KennelInferenceHandler(settings), settings)
    try:
        transformer.validate_and_initialize(model_dir=str(settings.model_dir))
    except Exception as exc:
        raise ServeError(f"cannot serve {settings.model_dir}: {exception_line(exc)}") from None
    del transformer
    gc.collect()


def start_metrics(settings: ServeSettings) -> None:
    """The Prometheus endpoint, when metrics are on. Only a port the operator named must bind: the
    default 9100 may be another exporter's (host networking, containers sharing a network)."""
    if not (settings.metrics and settings.metrics_port):
        return
    from kennel_serve.metrics_endpoint import start_metrics_endpoint
    try:
        start_metrics_endpoint(settings)
    except OSError as exc:
        where = f"{settings.bind_address}:{settings.metrics_port}"
        if settings.metrics_port_required:
            raise ServeError(f"cannot serve metrics on {where} (KENNEL_METRICS_PORT; 0: none): "
                             f"{exc.strerror or exc}") from None
        log.warning("no Prometheus endpoint: %s is taken (%s); set KENNEL_METRICS_PORT to another port, or 0",
                    where, exc.strerror or exc)


def loopback_port(avoid: set[int]) -> int:
    """A free port on 127.0.0.1 for MMS behind the multi-model routes (MMS refuses 32767 and up)."""
    for port in range(28080, 28180):
        if port in avoid:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise ServeError("no free port on 127.0.0.1 between 28080 and 28179 for multi-model-server")


def main() -> int:
    started = time.monotonic()
    logging.basicConfig(level=logging.WARNING, format="kennel-serve: %(message)s", stream=sys.stderr)
    stop = supervisor.StopSignals()
    try:
        settings = ServeSettings.from_env(os.environ)
        if settings.mms_plugins is None or not (settings.mms_plugins / mms_config.PLUGIN_JAR).is_file():
            raise ServeError(f"KENNEL_MMS_PLUGINS={settings.mms_plugins or ''} holds no {mms_config.PLUGIN_JAR} "
                             f"(build it with containers/serve/mms-plugin/build.sh)")
        cli = supervisor.find_mms_cli()
        if cli is None:
            raise ServeError("multi-model-server is not installed in this environment")
        reset_state_dir(settings.state_dir)
        if settings.multi_model:
            # No model yet: MMS serves the multi-model host, an empty folder, whose workers load the
            # models the /models routes name (multi_model_routes.py, kennel_serve.multi_model).
            served_dir, python_paths = settings.state_dir / "multi-model-host", []
            served_dir.mkdir()
            import kennel_serve.multi_model  # noqa: F401  (fails here, in one line, if the engine cannot load)
        else:
            served_dir = settings.model_dir
            code_dir = settings.model_dir / "code"
            python_paths = [path for path in (code_dir if code_dir.is_dir() else None,
                                              install_requirements(code_dir, settings.state_dir / "packages"))
                            if path is not None]
            sys.path[:0] = [str(path) for path in python_paths]
            check_model_serves(settings)
        start_metrics(settings)
    except (SettingsError, ServeError) as exc:
        print(f"kennel-serve: {exc}", file=sys.stderr, flush=True)
        return 1
    if stop.requested:
        return 0
    internal_port = secret = None
    if settings.multi_model:
        try:
            internal_port, secret = loopback_port(avoid={settings.port, settings.metrics_port}), secrets.token_hex(32)
            multi_model_routes.start_front(settings, internal_port, secret)
        except (OSError, ServeError) as exc:
            print(f"kennel-serve: cannot serve on {settings.bind_address}:{settings.port}: {exception_line(exc)}",
                  file=sys.stderr, flush=True)
            return 1
        log.warning("multi-model endpoint: no model at start, POST /models loads one; starting multi-model-server "
                    "on 127.0.0.1:%d", internal_port)
    else:
        log.warning("model %s checked and warmed up in %.1f s; starting multi-model-server", settings.model_dir,
                    time.monotonic() - started)
    process = supervisor.start_mms(cli, mms_config.write_mms_properties(settings, internal_port), served_dir,
                                   mms_config.mms_environment(settings, python_paths, secret), settings.state_dir)
    try:
        return supervisor.supervise(process, settings, stop, started)
    finally:
        if process.poll() is None:
            supervisor.stop_mms(process)
