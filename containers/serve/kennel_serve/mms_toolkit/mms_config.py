"""MMS's configuration file and environment, written instead of the toolkit's.

The toolkit's start_model_server (sagemaker-inference 1.10.1,
model_server._generate_mms_config_properties) is not used, because what it writes is
wrong for an endpoint:

- default_response_timeout=SAGEMAKER_MODEL_SERVER_TIMEOUT, which multi-model-server
  1.1.11 reads as MINUTES: a stuck request holds its worker for an hour. Written here:
  default_response_timeout_seconds.
- management_address=http://0.0.0.0:<the inference port>: any client can list,
  register, scale and delete models. Here the management API answers on a Unix socket
  in the state dir only.
- vmargs=-XX:-UseContainerSupport: the JVM sizes its heap from the host's memory, not
  the container's limit. Here settings.DEFAULT_VMARGS (SAGEMAKER_MODEL_SERVER_VMARGS
  still replaces them).
- max_request_size=the payload limit: a body over it gets Netty's bare 413, no reason.
  Here bodies up to twice the limit reach KennelTransformer, which refuses them with
  a JSON 413; beyond that Netty's 413 answers before anything is buffered.
- no plugins: MMS's own /ping says 200 as soon as the port is bound, while workers
  still load and after all of them failed, and MMS has no /execution-parameters. Here
  plugins_path names kennel's plugin jar (mms-plugin/: PingEndpoint,
  ExecutionParametersEndpoint), which reads KENNEL_SERVE_STATE_DIR and
  KENNEL_EXECUTION_PARAMETERS from the environment written below.
- no preload: each worker would import ONNX Runtime and numpy on its own. Here
  preload_model=true, with handler_service.py's fork hooks.
- MMS's pid file and worker sockets in /tmp (see launcher.reset_state_dir): TMPDIR here
  points into the state dir.

Proved by: tests/unit/test_serve_launcher.py::test_mms_configuration_works_around_the_toolkit_defaults,
tests/unit/test_serve_launcher.py::test_mms_environment,
tests/contract/test_serve_lifecycle.py::test_a_stuck_request_is_cut_after_the_model_server_timeout,
tests/contract/test_serve_http.py::test_ping_execution_parameters_and_no_management_api,
tests/contract/test_serve_http.py::test_payload_over_the_limit_is_413,
tests/contract/test_serve_lifecycle.py::test_ping_is_200_only_after_a_worker_loaded_and_warmed_up.
"""
from __future__ import annotations

import os
from pathlib import Path

from kennel_serve.settings import MIB, ServeSettings

HANDLER_SERVICE = "kennel_serve.mms_toolkit.handler_service"
PLUGIN_JAR = "kennel-mms-plugin.jar"
LOG_CONFIG = Path(__file__).with_name("etc") / "log4j2.xml"
MMS_MODEL_NAME = "model"
# The JVM flags MMS's frontend gets by default (kennel_serve.settings.DEFAULT_VMARGS), and why.
# UseContainerSupport: size the heap from the container's memory limit, not the host's
# (the toolkit passes -XX:-UseContainerSupport); the heap only holds request bodies in
# flight. TieredStopAtLevel=1 (C1 only) and the serial collector: no C2 compiler or
# parallel GC threads competing with the model for the CPUs at start; the JVM binds its
# port sooner (docs/benchmarks.md), and its per-request work is microseconds next to a
# CNN's milliseconds. Xmn16m: a small young generation, reused after each (millisecond)
# collection; left to size itself from the host's memory, the JVM kept touching new heap
# pages under load, and the container's memory rose for minutes before it levelled off.


def mms_properties(settings: ServeSettings, internal_port: int | None = None) -> str:
    """``internal_port``: MMS listens on 127.0.0.1 there, behind multi_model_routes.py (multi-model mode)."""
    payload = settings.max_payload_bytes
    address = (f"http://127.0.0.1:{internal_port}" if internal_port is not None
               else f"http://{settings.bind_address}:{settings.port}")
    properties = {
        # Environment variables MMS_<PROPERTY> may still override any line (operators' escape hatch).
        "enable_envvars_config": "true",
        "decode_input_request": "false",
        "default_service_handler": HANDLER_SERVICE,
        "default_workers_per_model": settings.workers,
        # Seconds. (MMS reads default_response_timeout, which the toolkit writes, as MINUTES.)
        "default_response_timeout_seconds": settings.model_server_timeout_s,
        "inference_address": address,
        # The management API (register/scale/delete models) answers on a Unix socket only,
        # never on the port clients reach.
        "management_address": f"unix:{settings.state_dir / 'management.sock'}",
        "use_native_io": "true",
        # Bodies up to twice the limit reach the handler, which refuses them with a JSON 413;
        # beyond that Netty's own bare 413 answers before anything is buffered.
        "max_request_size": max(2 * payload, payload + MIB),
        "max_response_size": 16 * MIB,
        "vmargs": settings.vmargs,
        "plugins_path": settings.mms_plugins,
        # The server process imports once; each forked worker loads its own model (handler_service).
        "preload_model": "true",
    }
    return "".join(f"{key}={value}\n" for key, value in properties.items())


def write_mms_properties(settings: ServeSettings, internal_port: int | None = None) -> Path:
    path = settings.state_dir / "mms.properties"
    path.write_text(mms_properties(settings, internal_port))
    return path


def mms_environment(settings: ServeSettings, python_paths: list[Path], mme_secret: str | None = None) -> dict[str, str]:
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
    if mme_secret is not None:
        # What proves to a worker that a job came from multi_model_routes.py, not a client.
        env["KENNEL_MME_SECRET"] = mme_secret
    paths = [str(p) for p in python_paths] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    return env
