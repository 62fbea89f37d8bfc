"""Every serving setting, read once from the environment and validated.

SageMaker's own variables (SAGEMAKER_*) keep their meaning; KENNEL_* variables
cover what the contract leaves open. A bad value is a SettingsError naming the
variable, which `serve` prints as its one line before exiting.
"""
from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from kennel_artifact import DEFAULT_MAX_PIXELS

from kennel_serve.cpus import available_cpus, solo_threads, worker_layout

MIB = 1024 * 1024
BATCH_STRATEGIES = ("MULTI_RECORD", "SINGLE_RECORD")
# Decoding time grows with pixels: 200 megapixels in all is five 40-megapixel photos,
# or 32 phone pictures of 6 megapixels.
DEFAULT_MAX_REQUEST_PIXELS = 200_000_000
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


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
    batch: bool = False
    batch_strategy: str = "MULTI_RECORD"
    max_concurrent_transforms: int = 1
    drain_timeout_s: float = 20.0
    state_dir: Path = Path("/tmp/kennel-serve")
    mms_plugins: Path | None = None
    vmargs: str = ""
    url: UrlFetchSettings = field(default_factory=UrlFetchSettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "ServeSettings":
        read = _Reader(env)
        if read.flag("SAGEMAKER_MULTI_MODEL", False):
            raise SettingsError("SAGEMAKER_MULTI_MODEL=true: multi-model endpoints are not supported by this image")
        cpus = available_cpus()
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
        strategy = env.get("SAGEMAKER_BATCH_STRATEGY", "MULTI_RECORD").strip().upper().replace("-", "_")
        if strategy not in BATCH_STRATEGIES:
            raise SettingsError(f"SAGEMAKER_BATCH_STRATEGY={strategy!r} must be one of {', '.join(BATCH_STRATEGIES)}")
        networks, hosts = _allowlist(env.get("KENNEL_URL_ALLOWLIST", ""))
        plugins = env.get("KENNEL_MMS_PLUGINS")
        return cls(
            model_dir=Path(env.get("SAGEMAKER_BASE_DIR", "/opt/ml")) / "model",
            # multi-model-server refuses ports from 32767 up (it stores them in a Java short).
            port=read.integer("SAGEMAKER_BIND_TO_PORT", 8080, low=1, high=32766),
            bind_address=env.get("KENNEL_BIND_ADDRESS", "0.0.0.0"),
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
            batch=batch,
            batch_strategy=strategy,
            max_concurrent_transforms=concurrent or workers,
            drain_timeout_s=read.number("KENNEL_DRAIN_TIMEOUT_S", 20.0, low=0, high=25),
            state_dir=Path(env.get("KENNEL_SERVE_STATE_DIR", "/tmp/kennel-serve")),
            mms_plugins=Path(plugins) if plugins else None,
            vmargs=env.get("SAGEMAKER_MODEL_SERVER_VMARGS", ""),
            url=UrlFetchSettings(
                enabled=read.flag("KENNEL_URL_FETCH", True),
                allowed_networks=networks,
                allowed_hosts=hosts,
                connect_timeout_s=read.number("KENNEL_URL_CONNECT_TIMEOUT_S", 2.0, low=0.01, high=60),
                timeout_s=read.number("KENNEL_URL_TIMEOUT_S", 5.0, low=0.01, high=55),
                max_bytes=read.integer("KENNEL_URL_MAX_BYTES", 10 * MIB, low=1),
                max_redirects=read.integer("KENNEL_URL_MAX_REDIRECTS", 3, low=0, high=10),
            ),
        )

    def execution_parameters(self) -> str:
        """The JSON answer to GET /execution-parameters (SageMaker batch transform)."""
        return json.dumps({"MaxConcurrentTransforms": self.max_concurrent_transforms,
                           "BatchStrategy": self.batch_strategy,
                           "MaxPayloadInMB": self.max_payload_bytes // MIB})


class _Reader:
    def __init__(self, env: Mapping[str, str]):
        self._env = env

    def _raw(self, name: str) -> str | None:
        value = self._env.get(name)
        return None if value is None or not value.strip() else value.strip()

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
        raw = self._env.get(name)
        if raw is None:
            return default
        if raw.strip().lower() in _TRUE:
            return True
        if raw.strip().lower() in _FALSE:
            return False
        raise SettingsError(f"{name}={raw!r} must be true or false")


def _in_range(name, value, low, high):
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise SettingsError(f"{name}={value} must be {bounds}")
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
