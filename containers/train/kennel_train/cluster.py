"""The job's hosts as SageMaker describes them, and how many processes run where.

SageMaker (and the compose file for two hosts) starts the same image on every
host with /opt/ml/input/config/resourceconfig.json naming all hosts and the
current one. Hosts are sorted so every host picks the same master (the first)
and the same node rank (its position); one process per GPU, or one per host on
CPU; NCCL on GPUs, gloo on CPUs, on the network interface the resource config
names.

Settings (environment; SageMaker passes them as the job's Environment):

  KENNEL_DIST_PORT                 rendezvous port on the master host (29500)
  KENNEL_DIST_DNS_TIMEOUT          seconds to wait for peers' names to resolve (300)
  KENNEL_DIST_RENDEZVOUS_TIMEOUT   seconds to wait for every host to join (600)
  KENNEL_DIST_COLLECTIVE_TIMEOUT   seconds one collective may wait for a peer (300)
  KENNEL_DIST_HEARTBEAT_TIMEOUT    seconds of silence after which a peer is lost (60)
  KENNEL_DIST_PROCESSES_PER_HOST   processes on each host (default: GPUs, or 1)
  KENNEL_DIST_ADDRESSES            "host=address,..." used instead of DNS for
                                   those names (hosts without a resolver entry)
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from .failure import TrainingFailure

log = logging.getLogger(__name__)


class DistributedError(TrainingFailure):
    """A distributed-setup or peer problem; the message is the job's failure reason."""


@dataclass(frozen=True)
class Cluster:
    """The hosts of the job, as resourceconfig.json gives them (sorted: every host agrees)."""

    hosts: tuple[str, ...]
    current_host: str
    network_interface: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "hosts", tuple(sorted(self.hosts)))

    @property
    def node_rank(self) -> int:
        return self.hosts.index(self.current_host)

    @property
    def master(self) -> str:
        return self.hosts[0]


def read_cluster(path: str | Path) -> Cluster:
    """Parse resourceconfig.json; a missing file means one host (a plain ``docker run``)."""
    path = Path(path)
    if not path.is_file():
        return Cluster(hosts=(socket.gethostname(),), current_host=socket.gethostname())
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DistributedError(f"cannot read {path.name}: {error}") from None
    if not isinstance(config, dict):
        raise DistributedError(f"{path.name} must hold a JSON object")
    hosts, current = config.get("hosts"), config.get("current_host")
    if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) and h for h in hosts):
        raise DistributedError(f"{path.name}: 'hosts' must be a non-empty list of host names, got {hosts!r}")
    if len(set(hosts)) != len(hosts):
        raise DistributedError(f"{path.name}: 'hosts' lists a host twice: {hosts!r}")
    if not isinstance(current, str) or current not in hosts:
        raise DistributedError(f"{path.name}: 'current_host' {current!r} is not one of 'hosts' {hosts!r}")
    interface = config.get("network_interface_name")
    if interface is not None and (not isinstance(interface, str) or not interface):
        raise DistributedError(f"{path.name}: 'network_interface_name' must be an interface name, got {interface!r}")
    return Cluster(hosts=tuple(hosts), current_host=current, network_interface=interface)


def _seconds(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 7 * 24 * 3600:
        raise DistributedError(f"{name} must be a number of seconds above 0, got {raw!r}")
    return value


def _addresses(raw: str) -> dict[str, str]:
    addresses = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        host, _, address = item.partition("=")
        if not host.strip() or not address.strip():
            raise DistributedError(f"KENNEL_DIST_ADDRESSES must look like 'host=address,host=address', got {raw!r}")
        addresses[host.strip()] = address.strip()
    return addresses


@dataclass(frozen=True)
class Settings:
    """The tunables of a distributed run (see the module docstring)."""

    port: int = 29500
    dns_timeout_s: float = 300.0
    rendezvous_timeout_s: float = 600.0
    collective_timeout_s: float = 300.0
    heartbeat_timeout_s: float = 60.0
    processes_per_host: int | None = None
    addresses: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        environ = os.environ if environ is None else environ
        raw_port = environ.get("KENNEL_DIST_PORT", "").strip() or "29500"
        if not raw_port.isdigit() or not 1 <= int(raw_port) <= 65535:
            raise DistributedError(f"KENNEL_DIST_PORT must be a port number 1-65535, got {raw_port!r}")
        raw_procs = environ.get("KENNEL_DIST_PROCESSES_PER_HOST", "").strip()
        if raw_procs and (not raw_procs.isdigit() or not 1 <= int(raw_procs) <= 64):
            raise DistributedError(f"KENNEL_DIST_PROCESSES_PER_HOST must be 1-64, got {raw_procs!r}")
        return cls(
            port=int(raw_port),
            dns_timeout_s=_seconds(environ, "KENNEL_DIST_DNS_TIMEOUT", cls.dns_timeout_s),
            rendezvous_timeout_s=_seconds(environ, "KENNEL_DIST_RENDEZVOUS_TIMEOUT", cls.rendezvous_timeout_s),
            collective_timeout_s=_seconds(environ, "KENNEL_DIST_COLLECTIVE_TIMEOUT", cls.collective_timeout_s),
            heartbeat_timeout_s=_seconds(environ, "KENNEL_DIST_HEARTBEAT_TIMEOUT", cls.heartbeat_timeout_s),
            processes_per_host=int(raw_procs) if raw_procs else None,
            addresses=_addresses(environ.get("KENNEL_DIST_ADDRESSES", "")),
        )


@dataclass(frozen=True)
class Layout:
    """Which processes run where: ranks are numbered host by host."""

    cluster: Cluster
    processes_per_host: int
    use_cuda: bool

    @property
    def world_size(self) -> int:
        return len(self.cluster.hosts) * self.processes_per_host

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def backend(self) -> str:
        return "nccl" if self.use_cuda else "gloo"

    def rank(self, local_rank: int) -> int:
        return self.cluster.node_rank * self.processes_per_host + local_rank

    def host_of(self, rank: int) -> str:
        return self.cluster.hosts[rank // self.processes_per_host]


def plan(cluster: Cluster, settings: Settings, cuda_devices: int | None = None) -> Layout:
    """One process per GPU, or one per host on CPU, unless the settings say otherwise."""
    if cuda_devices is None:
        cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    processes = settings.processes_per_host or max(1, cuda_devices)
    if cuda_devices and processes > cuda_devices:
        raise DistributedError(f"KENNEL_DIST_PROCESSES_PER_HOST={processes} but this host has {cuda_devices} GPUs")
    return Layout(cluster=cluster, processes_per_host=processes, use_cuda=cuda_devices > 0)


def resolve_hosts(hosts: Iterable[str], settings: Settings, sleep: Callable[[float], None] = time.sleep,
                  clock: Callable[[], float] = time.monotonic) -> dict[str, str]:
    """Every host's IPv4 address; names are retried until they resolve or the DNS timeout ends.

    SageMaker registers the hosts' names while the job starts, so a peer's name
    may not resolve at first. KENNEL_DIST_ADDRESSES bypasses DNS per name.
    """
    addresses: dict[str, str] = {}
    pending = [host for host in hosts if host not in settings.addresses]
    addresses.update({host: settings.addresses[host] for host in hosts if host in settings.addresses})
    deadline = clock() + settings.dns_timeout_s
    delay = 0.5
    while pending:
        for host in list(pending):
            try:
                addresses[host] = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
                pending.remove(host)
            except OSError:
                pass
        if not pending:
            break
        if clock() >= deadline:
            names = ", ".join(pending)
            raise DistributedError(
                f"host name{'s' if len(pending) > 1 else ''} {names} did not resolve within "
                f"{settings.dns_timeout_s:.0f} s (KENNEL_DIST_DNS_TIMEOUT): is every host of "
                "resourceconfig.json running on the same network?")
        log.info("waiting for %s to resolve", ", ".join(pending))
        sleep(min(delay, max(0.0, deadline - clock())))
        delay = min(delay * 2, 5.0)
    return addresses


def set_network_interface(name: str | None, use_cuda: bool, environ: dict[str, str] | None = None) -> None:
    """Point gloo/NCCL at the interface resourceconfig.json names (an explicit setting wins)."""
    environ = os.environ if environ is None else environ
    if not name:
        return
    available = [entry[1] for entry in socket.if_nameindex()]
    if name not in available:
        raise DistributedError(f"network interface {name!r} from resourceconfig.json does not exist on this "
                               f"host (it has: {', '.join(available)})")
    environ.setdefault("GLOO_SOCKET_IFNAME", name)
    if use_cuda:
        environ.setdefault("NCCL_SOCKET_IFNAME", name)


def short_error(error: BaseException, limit: int = 300) -> str:
    """An exception's text fit for a failure reason: one line, no C++ source location, no generic advice."""
    text = " ".join(str(error).split()) or type(error).__name__
    text = re.sub(r"^\[[^\]]*\.(?:cpp|cc|hpp|h):\d+\]\s*", "", text)
    # gloo appends generic advice to every transport error.
    text = re.sub(r"\s*This is typically caused by .*$", "", text)
    return text[:limit]
