"""Data-parallel training across hosts and GPUs, started from SageMaker's resourceconfig.json.

SageMaker (and the compose file for two hosts) starts the same image on every
host with /opt/ml/input/config/resourceconfig.json naming all hosts and the
current one. The toolkit's ``train`` knows nothing about PyTorch DDP, so this
module starts it itself:

* master = the first host in sorted order; node rank = the position of the
  current host; one process per GPU (spawned here, SIGTERM forwarded to them)
  or one per host on CPU; NCCL on GPUs, gloo on CPUs; the network interface
  from the resource config (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME).
* Every wait is bounded: peers' DNS names are retried until they resolve, the
  rendezvous has a timeout and names the hosts that never joined, collectives
  have a timeout, and a heartbeat watchdog ends a rank whose peer went silent.
* The training loop sees a :class:`Group` whatever the topology: a single
  process gets one whose operations are the identity, so the loop has one path.

Settings (environment; SageMaker passes them as the job's Environment):

  KENNEL_DIST_PORT                 rendezvous port on the master host (29500)
  KENNEL_DIST_DNS_TIMEOUT          seconds to wait for peers' names to resolve (300)
  KENNEL_DIST_RENDEZVOUS_TIMEOUT   seconds to wait for every rank to join (600)
  KENNEL_DIST_COLLECTIVE_TIMEOUT   seconds one collective may wait for a peer (300)
  KENNEL_DIST_HEARTBEAT_TIMEOUT    seconds of silence after which a peer is lost (60)
  KENNEL_DIST_PROCESSES_PER_HOST   processes on each host (default: GPUs, or 1)
  KENNEL_DIST_ADDRESSES            "host=address,..." used instead of DNS for
                                   those names (hosts without a resolver entry)
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, Subset

from .failure import TrainingFailure, write_failure

log = logging.getLogger(__name__)

# Store keys (under one prefix, so nothing else in the store can collide).
_PREFIX = "kennel/"
_JOINED = _PREFIX + "joined/{rank}"
_HEARTBEAT = _PREFIX + "heartbeat/{rank}"
_OUTCOME = _PREFIX + "outcome"
_ACKS = _PREFIX + "acks"
# A heartbeat value that means "finished on purpose": the watchdog stops watching that rank.
_FINISHED = "finished"
# How long the leader waits for the others to read the outcome before it exits
# (its exit closes the store they read from).
_ACK_TIMEOUT_S = 60.0
# After one local process fails, how long its siblings get to notice and write
# their own reasons before they are terminated.
_SIBLING_GRACE_S = 15.0


class DistributedError(TrainingFailure):
    """A distributed-setup or peer problem; the message is the job's failure reason."""


# --------------------------------------------------------------------------- topology


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


# --------------------------------------------------------------------------- network


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


# --------------------------------------------------------------------------- watchdog


class Watchdog(threading.Thread):
    """Publishes this rank's heartbeat to the rendezvous store and watches the others'.

    A peer whose heartbeat stops changing for ``timeout_s`` (a host that died
    without closing its connections, a frozen process), or a store that stops
    answering (the master host is gone), ends this process through ``on_lost``.
    Collectives alone would notice only at their own timeout, and a rank that
    waits outside a collective (for the leader's export) would not at all.
    """

    def __init__(self, store: dist.Store, rank: int, world_size: int, host_of: Callable[[int], str],
                 master: str, timeout_s: float, on_lost: Callable[[str], None]):
        super().__init__(name="kennel-heartbeat", daemon=True)
        self._store = store.clone()  # one connection per thread
        self._store.set_timeout(datetime.timedelta(seconds=timeout_s))
        self._rank, self._world_size, self._host_of = rank, world_size, host_of
        self._master, self._timeout_s, self._on_lost = master, timeout_s, on_lost
        self._interval_s = max(0.2, min(5.0, timeout_s / 10))
        self._stopping = threading.Event()

    def stop(self, finished: bool) -> None:
        """Stop beating; with ``finished`` tell the peers this rank left on purpose."""
        self._stopping.set()
        self.join(timeout=self._interval_s + self._timeout_s)
        if finished:
            try:
                self._store.set(_HEARTBEAT.format(rank=self._rank), _FINISHED)
            except Exception:  # the peers may be gone already; nothing left to tell
                pass

    def _exchange(self, beat: int, keys: list[str]) -> list[bytes]:
        """Publish this rank's beat and read the peers' (on a daemon thread, bounded by the timeout).

        A TCPStore call to a frozen server blocks in recv without a timeout, so
        the call runs on a throwaway thread and is abandoned when it overruns.
        """
        result: list = []

        def call() -> None:
            try:
                self._store.set(_HEARTBEAT.format(rank=self._rank), str(beat))
                result.append(self._store.multi_get(keys))
            except Exception as error:
                result.append(error)

        caller = threading.Thread(target=call, name="kennel-heartbeat-call", daemon=True)
        caller.start()
        caller.join(self._timeout_s)
        if not result:
            raise TimeoutError(f"no answer for {self._timeout_s:.0f} s (KENNEL_DIST_HEARTBEAT_TIMEOUT)")
        if isinstance(result[0], Exception):
            raise result[0]
        return result[0]

    def run(self) -> None:
        peers = [rank for rank in range(self._world_size) if rank != self._rank]
        keys = [_HEARTBEAT.format(rank=rank) for rank in peers]
        last_value: dict[int, bytes] = {}
        last_change = {rank: time.monotonic() for rank in peers}
        beat = 0
        while not self._stopping.wait(self._interval_s):
            beat += 1
            try:
                values = self._exchange(beat, keys)
            except Exception as error:
                if not self._stopping.is_set():
                    self._on_lost(f"lost contact with the master host {self._master} (rank 0): "
                                  f"{_short(error)}; it stopped, froze or lost its network, see its log")
                return
            now = time.monotonic()
            for rank, value in zip(peers, values, strict=True):
                if value == _FINISHED.encode():
                    last_change[rank] = float("inf")
                elif value != last_value.get(rank):
                    last_value[rank], last_change[rank] = value, now
                elif now - last_change[rank] > self._timeout_s and not self._stopping.is_set():
                    self._on_lost(f"host {self._host_of(rank)} (rank {rank}) sent no heartbeat for "
                                  f"{self._timeout_s:.0f} s (KENNEL_DIST_HEARTBEAT_TIMEOUT): it stopped, "
                                  "froze or lost its network")
                    return


def _short(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    # torch prefixes C++ errors with the source location: noise in a failure reason.
    text = re.sub(r"^\[[^\]]*\.(?:cpp|cc|hpp|h):\d+\]\s*", "", text)
    # gloo appends generic advice to every transport error.
    text = re.sub(r"\s*This is typically caused by .*$", "", text)
    return text[:limit]


# --------------------------------------------------------------------------- the group


class Group:
    """This process's place in the job and the few collectives training needs.

    With ``world_size == 1`` (one host, one process) every operation is local.
    """

    def __init__(self, layout: Layout, local_rank: int = 0, addresses: Mapping[str, str] | None = None,
                 store: dist.Store | None = None, watchdog: Watchdog | None = None,
                 settings: Settings | None = None):
        self.layout = layout
        self.local_rank = local_rank
        self.rank = layout.rank(local_rank)
        self.world_size = layout.world_size
        self.host = layout.cluster.current_host
        self.addresses = dict(addresses or {})
        self.settings = settings or Settings()
        self._store = store
        self._watchdog = watchdog
        if layout.use_cuda:
            self.device = torch.device("cuda", local_rank)
        else:
            self.device = torch.device("cpu")

    # -- identity
    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_leader(self) -> bool:
        """Rank 0 alone writes the model, the outputs and the checkpoints."""
        return self.rank == 0

    @property
    def leader_host(self) -> str:
        return self.layout.cluster.master

    @property
    def label(self) -> str:
        return f"{self.host} rank {self.rank}/{self.world_size}"

    def host_of(self, rank: int) -> str:
        return self.layout.host_of(rank)

    # -- data
    def shard(self, dataset: Dataset) -> Dataset:
        """This rank's share of an evaluation set: every sample exactly once across ranks.

        Shards may differ by one sample, so evaluation agrees on a stop only
        after its pass (no collective per batch); the reduced metrics are exact.
        Training shards are equal instead (data.ResumableSampler, a
        DistributedSampler): DDP needs the same number of steps on every rank.
        """
        if not self.distributed:
            return dataset
        return Subset(dataset, range(self.rank, len(dataset), self.world_size))

    # -- model
    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """DDP over ``module`` (its trainable parameters are all-reduced), or the module itself.

        Gradients are all-reduced in buckets while backward still runs (DDP's
        autograd hooks), and ``gradient_as_bucket_view`` lets the gradients live
        in the communication buckets instead of being copied into them.
        """
        if not self.distributed:
            return module
        return DistributedDataParallel(
            module,
            device_ids=[self.local_rank] if self.layout.use_cuda else None,
            gradient_as_bucket_view=True,
        )

    @staticmethod
    def unwrap(module: torch.nn.Module) -> torch.nn.Module:
        """The plain module under DDP: for evaluation (no collective per batch) and for saving."""
        return module.module if isinstance(module, DistributedDataParallel) else module

    # -- collectives
    def _tensor(self, values: Sequence[float], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(list(values), dtype=dtype, device=self.device)

    def all_sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over all ranks (float64): loss sums, correct counts, sample counts."""
        if not self.distributed:
            return [float(v) for v in values]
        tensor = self._tensor(values, torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def stop_requested(self, here: bool) -> list[str]:
        """The hosts whose ranks asked to stop (SIGTERM); empty when all go on.

        Every rank calls this at the same step boundaries, so a signal on any
        host stops all of them at the same step.
        """
        if not self.distributed:
            return [self.host] if here else []
        flags = torch.zeros(self.world_size, dtype=torch.int32, device=self.device)
        flags[self.rank] = int(bool(here))
        dist.all_reduce(flags, op=dist.ReduceOp.SUM)
        return sorted({self.host_of(rank) for rank, flag in enumerate(flags.tolist()) if flag})

    def broadcast(self, obj: Any) -> Any:
        """The leader's ``obj`` on every rank (a checkpoint, a decision)."""
        if not self.distributed:
            return obj
        box = [obj if self.is_leader else None]
        dist.broadcast_object_list(box, src=0, device=self.device if self.layout.use_cuda else None)
        return box[0]

    def agree(self, what: str, summary: str, details: Iterable[str] = ()) -> None:
        """Fail unless every rank sees the same ``what``: ``summary`` is shown, ``details`` compared by digest.

        Sharding by rank assumes the same samples in the same order on every
        host; a host with other data (S3DataDistributionType ShardedByS3Key, a
        partial copy) would silently train on a mix.
        """
        if not self.distributed:
            return
        digest = hashlib.sha256()
        for item in details:
            digest.update(item.encode("utf-8", "surrogateescape") + b"\0")
        mine = f"{summary} (sha256 {digest.hexdigest()[:12]})"
        seen: list[Any] = [None] * self.world_size
        dist.all_gather_object(seen, mine)
        other = next((rank for rank, value in enumerate(seen) if value != seen[0]), None)
        if other is not None:
            raise DistributedError(f"the hosts see different {what}: {self.host_of(0)} has {seen[0]}, "
                                   f"{self.host_of(other)} has {seen[other]}; every host needs the same {what} "
                                   "(S3DataDistributionType FullyReplicated)")

    # -- the end
    def finish(self, failure: str | None, timeout_s: float = 3600.0) -> str | None:
        """Agree on the outcome once the leader has written (or failed to write) the artifacts.

        The leader publishes ``failure`` (None: success); every other rank waits
        for it (bounded; a dead leader is noticed at once, since the store lives
        in its process) and returns the leader's failure as its own, so all
        hosts end the same way. Returns the failure reason this rank should
        report, or None.
        """
        if not self.distributed:
            return failure
        assert self._store is not None
        try:
            if self.is_leader:
                self._store.set(_OUTCOME, json.dumps({"failure": failure}))
                # On a failure a peer may be gone already: do not wait long for it.
                deadline = time.monotonic() + (_ACK_TIMEOUT_S if failure is None else _ACK_TIMEOUT_S / 6)
                while self._store.add(_ACKS, 0) < self.world_size - 1 and time.monotonic() < deadline:
                    time.sleep(0.1)
                self._stop_watchdog()
                return failure
            self._store.wait([_OUTCOME], datetime.timedelta(seconds=timeout_s))
            leader_failure = json.loads(self._store.get(_OUTCOME))["failure"]
            # Stop watching before the acknowledgement: once every rank has
            # acknowledged, the leader exits and its store goes away.
            self._stop_watchdog()
            self._store.add(_ACKS, 1)
        except Exception as error:
            return failure or f"the leader host {self.leader_host} did not report its result: {_short(error)}"
        if failure:
            return failure
        return f"the leader host {self.leader_host} failed: {leader_failure}" if leader_failure else None

    def _stop_watchdog(self, finished: bool = True) -> None:
        if self._watchdog is not None:
            self._watchdog.stop(finished=finished)
            self._watchdog = None

    def close(self, finished: bool = True) -> None:
        """Stop the watchdog and leave the process group."""
        self._stop_watchdog(finished)
        if dist.is_initialized():
            dist.destroy_process_group()

    # -- diagnostics
    def describe(self, error: BaseException) -> str | None:
        """A failure reason for an error that came from a peer, or None when it did not.

        gloo reports a lost peer as a RuntimeError naming its address: name the
        host instead, which is what the person reading the job's failure needs.
        """
        if not self.distributed or not isinstance(error, RuntimeError):
            return None
        text = str(error)
        lost = re.search(r"Connection (?:reset|closed|refused)|Broken pipe|Socket closed|"
                         r"(?:Read|Write) error|EOF|Connection timed out", text, re.IGNORECASE)
        timed_out = re.search(r"Timed out|timeout", text, re.IGNORECASE)
        if not (lost or timed_out or isinstance(error, dist.DistError)):
            return None
        address = re.search(r"\[([0-9a-fA-F.:]+)\]:\d+", text)
        peers = [host for host, ip in self.addresses.items()
                 if address and ip == address.group(1) and host != self.host]
        who = f"host {peers[0]}" if len(peers) == 1 else "a peer host"
        if lost:
            what = f"{who} left the job (its connection closed)"
        elif timed_out:
            what = (f"{who} did not answer within {self.settings.collective_timeout_s:.0f} s "
                    "(KENNEL_DIST_COLLECTIVE_TIMEOUT)")
        else:
            what = f"a collective failed with {who}"
        return f"distributed training stopped on {self.label}: {what}; see that host's log. ({_short(error, 200)})"


# --------------------------------------------------------------------------- starting


def _lost_peer(failure_file: Path | None) -> Callable[[str], None]:
    def on_lost(reason: str) -> None:
        log.error("%s", reason)
        if failure_file is not None:
            try:
                write_failure(failure_file, reason)
            except OSError:
                pass  # the log line carries the reason too
        for handler in logging.getLogger("kennel_train").handlers + logging.getLogger().handlers:
            handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        # The main thread may be blocked inside a collective: nothing short of
        # ending the process gets it out, and its peers see the connection close.
        os._exit(1)
    return on_lost


def join(layout: Layout, settings: Settings, local_rank: int = 0, failure_file: Path | None = None) -> Group:
    """Rendezvous with the other ranks and return this rank's :class:`Group`.

    A single-process layout returns a local group at once. Otherwise: resolve
    every host (bounded), check the interface, start the store on the master,
    wait until every rank has joined (bounded; the error names who did not),
    start the process group and the heartbeat watchdog.
    """
    if not layout.distributed:
        return Group(layout, local_rank, settings=settings)
    cluster = layout.cluster
    rank = layout.rank(local_rank)
    set_network_interface(cluster.network_interface, layout.use_cuda)
    addresses = resolve_hosts(cluster.hosts, settings)
    master_address = addresses[cluster.master]
    if layout.use_cuda:
        torch.cuda.set_device(local_rank)
    log.info("joining %d ranks on %d hosts as rank %d (%s, master %s at %s:%d)", layout.world_size,
             len(cluster.hosts), rank, layout.backend, cluster.master, master_address, settings.port)
    rendezvous = datetime.timedelta(seconds=settings.rendezvous_timeout_s)
    try:
        store = dist.TCPStore(master_address, settings.port, world_size=None, is_master=rank == 0,
                              timeout=rendezvous, wait_for_workers=False)
    except Exception as error:
        where = f"{cluster.master} ({master_address}:{settings.port})"
        if rank == 0:
            raise DistributedError(f"cannot listen for the other hosts on {where}: {_short(error)} "
                                   "(KENNEL_DIST_PORT chooses the port)") from None
        raise DistributedError(f"cannot reach the master host {where} within {settings.rendezvous_timeout_s:.0f} s "
                               f"(KENNEL_DIST_RENDEZVOUS_TIMEOUT): {_short(error)}; see the master's log") from None
    store.set(_HEARTBEAT.format(rank=rank), "0")
    store.set(_JOINED.format(rank=rank), cluster.current_host)
    joined_keys = [_JOINED.format(rank=r) for r in range(layout.world_size)]
    try:
        store.wait(joined_keys, rendezvous)
    except Exception as error:
        try:
            missing = [r for r, key in enumerate(joined_keys) if not store.check([key])]
        except Exception:
            raise DistributedError(f"lost the master host {cluster.master} during the rendezvous: "
                                   f"{_short(error)}") from None
        who = ", ".join(f"{layout.host_of(r)} (rank {r})" for r in missing)
        raise DistributedError(f"rendezvous timed out after {settings.rendezvous_timeout_s:.0f} s "
                               f"(KENNEL_DIST_RENDEZVOUS_TIMEOUT): {who} never joined; see "
                               f"{'its' if len(missing) == 1 else 'their'} log") from None
    # Watch the peers from here on: a master lost while the process group starts would
    # otherwise block this rank in the store until the rendezvous timeout.
    watchdog = Watchdog(store, rank, layout.world_size, layout.host_of, cluster.master,
                        settings.heartbeat_timeout_s, _lost_peer(failure_file))
    watchdog.start()
    dist.init_process_group(layout.backend, store=dist.PrefixStore("pg/", store), rank=rank,
                            world_size=layout.world_size,
                            timeout=datetime.timedelta(seconds=settings.collective_timeout_s),
                            device_id=torch.device("cuda", local_rank) if layout.use_cuda else None)
    group = Group(layout, local_rank, addresses, store, watchdog, settings)
    log.info("%s: joined (%s on %s)", group.label, layout.backend, cluster.network_interface or "default interface")
    return group


# --------------------------------------------------------------------------- processes


def _child(target: Callable[..., int], local_rank: int, args: tuple) -> None:
    # SIGINT goes to the whole process group on a terminal; the parent forwards
    # SIGTERM itself, so children only listen for what the parent sends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise SystemExit(target(local_rank, *args))


def launch(target: Callable[..., int], processes: int, args: tuple = ()) -> int:
    """Run ``target(local_rank, *args)`` in ``processes`` processes; return the job's exit code.

    One process: called here directly. More: spawned (CUDA cannot fork), with
    SIGTERM/SIGINT forwarded to all of them; when one fails the others get
    a grace period to notice (their collectives fail) and are then terminated.
    ``target`` must be a module-level function (it is pickled by name).
    """
    if processes == 1:
        return target(0, *args)
    context = multiprocessing.get_context("spawn")
    children = [context.Process(target=_child, args=(target, local_rank, args), name=f"kennel-rank-{local_rank}")
                for local_rank in range(processes)]

    def forward(signum: int, _frame: Any) -> None:
        for child in children:
            if child.pid is not None and child.exitcode is None:
                os.kill(child.pid, signal.SIGTERM)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        for child in children:
            child.start()
        failed_at: float | None = None
        while any(child.exitcode is None for child in children):
            running = [child.sentinel for child in children if child.exitcode is None]
            multiprocessing.connection.wait(running, timeout=1.0)
            if failed_at is None and any(child.exitcode not in (None, 0) for child in children):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > _SIBLING_GRACE_S:
                for child in children:
                    if child.exitcode is None:
                        child.terminate()
        codes = [child.exitcode for child in children]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    failures = [code for code in codes if code != 0]
    if not failures:
        return 0
    # A child killed by a signal has a negative exit code: report 128 + signal, as a shell would.
    first = failures[0]
    return first if first > 0 else 128 - first


def parameter_digest(module: torch.nn.Module) -> str:
    """sha256 over the module's parameters (names and bytes): equal on ranks that hold the same model."""
    digest = hashlib.sha256()
    for name, parameter in sorted(Group.unwrap(module).named_parameters(), key=lambda item: item[0]):
        digest.update(name.encode())
        digest.update(parameter.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
