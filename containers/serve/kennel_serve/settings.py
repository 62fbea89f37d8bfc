"""Every serving setting: one table (SETTINGS), read once from the environment and validated.

SageMaker's own variables (SAGEMAKER_*) keep their meaning; KENNEL_* variables
cover what the contract leaves open. SETTINGS is the only list of them: the
reader below refuses a name that is not in it, compose.yaml passes through the
ones marked ``compose`` and the serving docs' table is ``environment_table()``
(tests/unit/test_settings_sources.py holds both to it). A bad value is a
SettingsError naming the variable, which `serve` prints as its one line before exiting.
"""
from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import kennel_env
from kennel_artifact import DEFAULT_MAX_PIXELS

from kennel_serve.cpus import solo_threads, worker_layout
from kennel_serve.precision import INT8_MIN_SPEEDUP, PRECISIONS

MIB = 1024 * 1024
BATCH_STRATEGIES = ("MULTI_RECORD", "SINGLE_RECORD")
# The CreateTransformJob API's spelling of each, which the SDK's local mode insists on.
API_BATCH_STRATEGIES = {"MULTI_RECORD": "MultiRecord", "SINGLE_RECORD": "SingleRecord"}
# Decoding time grows with pixels: 200 megapixels in all is five 40-megapixel photos,
# or 32 phone pictures of 6 megapixels.
DEFAULT_MAX_REQUEST_PIXELS = 200_000_000
METRICS_PORT = 9100
DEFAULT_VMARGS = ("-XX:+UseContainerSupport -XX:MaxRAMPercentage=25 -XX:+ExitOnOutOfMemoryError "
                  "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC -Xmn16m")


@dataclass(frozen=True)
class EnvSetting:
    name: str
    default: str  # as the docs show it
    meaning: str
    compose: bool = True  # compose.yaml's serve service passes it through when set
    read_by: str = "kennel"  # "toolkit": sagemaker-inference reads it itself


SETTINGS: tuple[EnvSetting, ...] = (
    EnvSetting("SAGEMAKER_MODEL_SERVER_WORKERS", "one per CPU", "model workers (processes), each with its own model copy"),
    EnvSetting("KENNEL_ORT_THREADS", "CPUs / workers (1)",
               "ONNX Runtime threads of a request while other workers are busy too"),
    EnvSetting("KENNEL_ORT_SOLO_THREADS", "the CPUs; `KENNEL_ORT_THREADS` when that is set",
               "ONNX Runtime threads of a request that runs while every other worker is idle"),
    EnvSetting("SAGEMAKER_MAX_PAYLOAD_IN_MB", "6", "request body limit (413 above it)"),
    EnvSetting("SAGEMAKER_MODEL_SERVER_TIMEOUT", "60", "seconds a worker may take for one request"),
    EnvSetting("SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS", "unset",
               "the same, under the name newer SageMaker containers use; wins when both are set"),
    EnvSetting("SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT", "`application/json`",
               "the answer type for `Accept: */*` or none", read_by="toolkit"),
    EnvSetting("SAGEMAKER_PROGRAM", "`inference.py`", "the module in `code/` that may override handlers",
               read_by="toolkit"),
    EnvSetting("SAGEMAKER_BIND_TO_PORT", "8080", "the port (MMS accepts ports below 32767)", compose=False),
    EnvSetting("SAGEMAKER_MODEL_SERVER_VMARGS", f"`{DEFAULT_VMARGS}`",
               "JVM flags for MMS; a value replaces all of the default's (the 16 MiB young generation keeps "
               "memory flat under load)"),
    EnvSetting("SAGEMAKER_BATCH", "false", "set by batch transform: the worker count follows the concurrency",
               compose=False),
    EnvSetting("SAGEMAKER_BATCH_STRATEGY", "`MULTI_RECORD`", "set by batch transform; answered on "
               "`GET /execution-parameters`", compose=False),
    EnvSetting("SAGEMAKER_MAX_CONCURRENT_TRANSFORMS", "the workers", "set by batch transform; answered on "
               "`GET /execution-parameters`", compose=False),
    EnvSetting("SAGEMAKER_MULTI_MODEL", "false", "`true`: a multi-model endpoint (set by SageMaker): no model at "
               "start; the `/models` routes load, list, unload and invoke models "
               "([Multi-model endpoints](#multi-model-endpoints))", compose=False),
    EnvSetting("KENNEL_PRECISION", "`auto`",
               "`fp32`, `int8` (`model.int8.onnx`, when the model has one) or `auto`: INT8 only when it runs "
               f"{INT8_MIN_SPEEDUP} x as fast as FP32 on this CPU, measured at start-up; answers say which in "
               "`X-Kennel-Precision`"),
    EnvSetting("KENNEL_TOP_K", "5", "k of the top-k answer"),
    EnvSetting("KENNEL_MAX_IMAGES", "32", "images per request"),
    EnvSetting("KENNEL_MAX_IMAGE_PIXELS", str(DEFAULT_MAX_PIXELS), "larger images are refused from their header"),
    EnvSetting("KENNEL_MAX_REQUEST_PIXELS", str(DEFAULT_MAX_REQUEST_PIXELS),
               "decoded pixels of all the images of one request (413 above it)"),
    EnvSetting("KENNEL_URL_FETCH", "true", "`false`: no `{\"url\": ...}` requests"),
    EnvSetting("KENNEL_URL_ALLOWLIST", "empty",
               "comma-separated host names and CIDRs URL fetching may reach besides public addresses"),
    EnvSetting("KENNEL_URL_CONNECT_TIMEOUT_S", "2", "seconds to connect to an image server"),
    EnvSetting("KENNEL_URL_TIMEOUT_S", "5", "the one deadline of all the URLs of a request, every step included"),
    EnvSetting("KENNEL_URL_MAX_BYTES", str(10 * MIB), "bytes per fetched image"),
    EnvSetting("KENNEL_URL_MAX_REDIRECTS", "3", "redirects per URL, each checked like the first URL"),
    EnvSetting("KENNEL_DRAIN_TIMEOUT_S", "20", "longest wait for in-flight requests on SIGTERM (at most 25)"),
    EnvSetting("KENNEL_METRICS", "true", "a log line per request, stage timings in `Server-Timing` and the "
               "metrics below (their cost: docs/benchmarks.md); `false`: none of them, while "
               "`Server-Timing: worker` and `X-Kennel-Request-Id` are always there"),
    EnvSetting("KENNEL_METRICS_PORT", "9100", "port of the Prometheus text endpoint `GET /metrics`, off the "
               "client port; `0`: none (compose publishes it as `KENNEL_METRICS_HOST_PORT`); when it is not set and "
               "9100 is taken, serve goes on without the endpoint (a warning says so)", compose=False),
    EnvSetting("KENNEL_METRICS_EMF", "true (compose: false)",
               "CloudWatch Embedded Metric Format keys in each request's log line"),
    EnvSetting("KENNEL_METRICS_MODEL", "`kennel`", "the `Model` dimension / `model` label of every metric"),
    EnvSetting("KENNEL_BIND_ADDRESS", "`0.0.0.0`", "the address MMS listens on", compose=False),
    EnvSetting("KENNEL_SERVE_STATE_DIR", "`/tmp/kennel-serve`",
               "the server's runtime files (MMS config, sockets, worker activity)", compose=False),
    EnvSetting("KENNEL_MMS_PLUGINS", "`/opt/kennel/mms-plugins` (set by the image)",
               "folder of the MMS plugin jar (`/ping`, `/execution-parameters`)", compose=False),
    EnvSetting("SAGEMAKER_BASE_DIR", "`/opt/ml`", "the root of the SageMaker layout; the model is in `model/`",
               compose=False),
)
SETTINGS_BY_NAME = {setting.name: setting for setting in SETTINGS}


def environment_table() -> str:
    """The markdown table of SETTINGS, as the serving docs show it."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    rows += [f"| `{s.name}` | {s.default} | {s.meaning} |" for s in SETTINGS]
    return "\n".join(rows) + "\n"


class SettingsError(ValueError):
    """An environment variable holds a value serving cannot use."""


IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class UrlFetchSettings:
    """How {"url": ...} requests may fetch images (kennel_serve.url_fetch)."""

    enabled: bool = True
    # Addresses (CIDRs) and host names exempt from the public-address rule.
    allowed_networks: tuple[IpNetwork, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    # A worker waits for the download; the bounds keep one slow image host from holding it.
    connect_timeout_s: float = 2.0
    timeout_s: float = 5.0  # the whole download, redirects included
    max_bytes: int = 10 * MIB
    max_redirects: int = 3


@dataclass(frozen=True)
class ServeSettings:
    model_dir: Path
    port: int = 8080
    bind_address: str = "0.0.0.0"
    cpus: int = 1
    workers: int = 1
    ort_threads: int = 1
    solo_threads: int = 1  # engine threads for a request that runs while the other workers idle
    model_server_timeout_s: int = 60
    max_payload_bytes: int = 6 * MIB
    max_images: int = 32
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS
    top_k: int = 5
    precision: str = "auto"
    batch: bool = False
    batch_strategy: str = "MULTI_RECORD"
    max_concurrent_transforms: int = 1
    drain_timeout_s: float = 20.0
    state_dir: Path = Path("/tmp/kennel-serve")
    mms_plugins: Path | None = None
    vmargs: str = DEFAULT_VMARGS
    metrics: bool = False  # the environment's default is on (from_env)
    metrics_port: int = 0  # 0: no Prometheus endpoint (the environment's default is METRICS_PORT)
    metrics_port_required: bool = False  # KENNEL_METRICS_PORT was set: failing to bind it stops serve
    metrics_emf: bool = False
    metrics_model: str = "kennel"
    url: UrlFetchSettings = field(default_factory=UrlFetchSettings)
    multi_model: bool = False  # SageMaker's multi-model mode: models come and go through /models

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "ServeSettings":
        read = _Reader(env)
        cpus = kennel_env.usable_cpus()
        batch = read.flag("SAGEMAKER_BATCH", False)
        concurrent = read.integer("SAGEMAKER_MAX_CONCURRENT_TRANSFORMS", None, low=1)
        workers = read.integer("SAGEMAKER_MODEL_SERVER_WORKERS", None, low=1)
        if workers is None and batch and concurrent is not None:
            # Batch transform sends at most this many requests at once: more workers would idle.
            workers = min(concurrent, cpus)
        explicit_threads = read.integer("KENNEL_ORT_THREADS", None, low=1)
        workers, threads = worker_layout(cpus, workers, explicit_threads)
        solo = solo_threads(cpus, threads, explicit_threads is not None,
                            read.integer("KENNEL_ORT_SOLO_THREADS", None, low=1, high=256))
        strategy = read.text("SAGEMAKER_BATCH_STRATEGY", "MULTI_RECORD").upper().replace("-", "_")
        if strategy not in BATCH_STRATEGIES:
            raise SettingsError(f"SAGEMAKER_BATCH_STRATEGY={strategy!r} must be one of {', '.join(BATCH_STRATEGIES)}")
        precision = read.text("KENNEL_PRECISION", "auto").lower()
        if precision not in PRECISIONS:
            raise SettingsError(f"KENNEL_PRECISION={precision!r} must be one of {', '.join(PRECISIONS)}")
        networks, hosts = _allowlist(read.text("KENNEL_URL_ALLOWLIST", ""))
        plugins = read.text("KENNEL_MMS_PLUGINS", "")
        port = read.integer("SAGEMAKER_BIND_TO_PORT", 8080, low=1, high=32766)
        metrics_port = read.integer("KENNEL_METRICS_PORT", METRICS_PORT, low=0, high=65535)
        if metrics_port == port:
            raise SettingsError(f"KENNEL_METRICS_PORT={metrics_port} is the client port: the metrics need a port "
                                f"of their own (0: none)")
        return cls(
            model_dir=Path(read.text("SAGEMAKER_BASE_DIR", "/opt/ml")) / "model",
            # multi-model-server refuses ports from 32767 up (it stores them in a Java short).
            port=port,
            bind_address=read.text("KENNEL_BIND_ADDRESS", "0.0.0.0"),
            cpus=cpus,
            workers=workers,
            ort_threads=threads,
            solo_threads=solo,
            model_server_timeout_s=read.integer("SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS", None, low=1)
            or read.integer("SAGEMAKER_MODEL_SERVER_TIMEOUT", 60, low=1),
            max_payload_bytes=read.integer("SAGEMAKER_MAX_PAYLOAD_IN_MB", 6, low=1, high=1024) * MIB,
            max_images=read.integer("KENNEL_MAX_IMAGES", 32, low=1, high=1024),
            max_pixels=read.integer("KENNEL_MAX_IMAGE_PIXELS", DEFAULT_MAX_PIXELS, low=1),
            max_request_pixels=read.integer("KENNEL_MAX_REQUEST_PIXELS", DEFAULT_MAX_REQUEST_PIXELS, low=1),
            top_k=read.integer("KENNEL_TOP_K", 5, low=1),
            precision=precision,
            batch=batch,
            batch_strategy=strategy,
            max_concurrent_transforms=concurrent or workers,
            drain_timeout_s=read.number("KENNEL_DRAIN_TIMEOUT_S", 20.0, low=0, high=25),
            state_dir=Path(read.text("KENNEL_SERVE_STATE_DIR", "/tmp/kennel-serve")),
            mms_plugins=Path(plugins) if plugins else None,
            vmargs=read.text("SAGEMAKER_MODEL_SERVER_VMARGS", DEFAULT_VMARGS),
            metrics=read.flag("KENNEL_METRICS", True),
            metrics_port=metrics_port,
            metrics_port_required=bool(env.get("KENNEL_METRICS_PORT", "").strip()),
            metrics_emf=read.flag("KENNEL_METRICS_EMF", True),
            metrics_model=_metric_label(read.text("KENNEL_METRICS_MODEL", "kennel")),
            url=UrlFetchSettings(
                enabled=read.flag("KENNEL_URL_FETCH", True),
                allowed_networks=networks,
                allowed_hosts=hosts,
                connect_timeout_s=read.number("KENNEL_URL_CONNECT_TIMEOUT_S", 2.0, low=0.01, high=60),
                timeout_s=read.number("KENNEL_URL_TIMEOUT_S", 5.0, low=0.01, high=55),
                max_bytes=read.integer("KENNEL_URL_MAX_BYTES", 10 * MIB, low=1),
                max_redirects=read.integer("KENNEL_URL_MAX_REDIRECTS", 3, low=0, high=10),
            ),
            multi_model=read.flag("SAGEMAKER_MULTI_MODEL", False),
        )

    def execution_parameters(self, env: Mapping[str, str] | None = None) -> str:
        """The JSON answer to GET /execution-parameters (SageMaker batch transform).

        The service documents, and AWS's own containers answer, the environment's spelling
        (MULTI_RECORD). The SageMaker Python SDK's local mode copies BatchStrategy as given into
        its transform job and accepts only the API's spelling (MultiRecord: sagemaker/local/data.py
        get_batch_strategy_instance). Local mode is recognised by how it sets SAGEMAKER_BATCH: the
        literal "True" (sagemaker/local/entities.py _LocalTransformJob._get_container_environment),
        where the service sets "true"; that container gets the API's spelling.
        env: the container's environment (default: this process's, as the launcher read it).
        """
        batch_text = _Reader(os.environ if env is None else env).text("SAGEMAKER_BATCH", "")
        strategy = API_BATCH_STRATEGIES[self.batch_strategy] if batch_text == "True" else self.batch_strategy
        return json.dumps({"MaxConcurrentTransforms": self.max_concurrent_transforms,
                           "BatchStrategy": strategy,
                           "MaxPayloadInMB": self.max_payload_bytes // MIB})


class _Reader:
    """Reads the variables of SETTINGS, and only those: a name missing from the table is a bug."""

    def __init__(self, env: Mapping[str, str]):
        self._env = env

    def _raw(self, name: str) -> str | None:
        if name not in SETTINGS_BY_NAME:
            raise KeyError(f"{name} is not in kennel_serve.settings.SETTINGS")
        value = self._env.get(name)
        return None if value is None or not value.strip() else value.strip()

    def text(self, name: str, default: str) -> str:
        raw = self._raw(name)
        return default if raw is None else raw

    def integer(self, name: str, default: int | None, low: int | None = None, high: int | None = None) -> int | None:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r} is not a whole number") from None
        return _in_range(name, value, low, high)

    def number(self, name: str, default: float, low: float | None = None, high: float | None = None) -> float:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r} is not a number") from None
        return _in_range(name, value, low, high)

    def flag(self, name: str, default: bool) -> bool:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            return kennel_env.parse_bool(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r} must be true or false ({'/'.join(kennel_env.TRUE_WORDS)} or "
                                f"{'/'.join(kennel_env.FALSE_WORDS)})") from None


def _in_range(name, value, low, high):
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise SettingsError(f"{name}={value} must be {bounds}")
    return value


def _metric_label(value: str) -> str:
    """A model name that is safe as a CloudWatch dimension and a Prometheus label value."""
    if len(value) > 64 or not all(c.isalnum() or c in "-_." for c in value):
        raise SettingsError(f"KENNEL_METRICS_MODEL={value!r} must be at most 64 letters, digits, '-', '_' or '.'")
    return value


def _allowlist(raw: str) -> tuple[tuple[IpNetwork, ...], tuple[str, ...]]:
    """'127.0.0.1, 10.0.0.0/8, images.internal' -> (networks, host names)."""
    networks: list[IpNetwork] = []
    hosts: list[str] = []
    for entry in (item.strip() for item in raw.replace(";", ",").split(",")):
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            if not all(part.isalnum() or part in "-." for part in entry) or entry.startswith((".", "-")):
                raise SettingsError(f"KENNEL_URL_ALLOWLIST entry {entry!r} is neither an address/CIDR nor a host name")
            hosts.append(entry.lower().rstrip("."))
    return tuple(networks), tuple(hosts)
