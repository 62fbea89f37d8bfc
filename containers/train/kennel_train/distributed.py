"""The training loop's view of data parallelism: one :class:`Group`, whatever the topology.

A single process gets a group whose operations are the identity, so the loop
has one path. Under torchrun's agent (kennel_train.launch) each process joins
the others here: the agent's environment gives it its rank and the master's
store; the store carries the heartbeat (kennel_train.watchdog) and the
leader's outcome; the process group (NCCL on GPUs, gloo on CPUs) has the
collective timeout, so a stuck collective fails instead of hanging.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
import time
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, Subset

from .cluster import Cluster, DistributedError, Layout, Settings, plan, short_error  # noqa: F401 (the loop's names)
from .launch import record_failure
from .watchdog import HEARTBEAT, Watchdog, end_process

log = logging.getLogger(__name__)

# Store keys (under one prefix, so nothing else in the store can collide).
_JOINED = "kennel/joined/{rank}"
_OUTCOME = "kennel/outcome"
_ACKS = "kennel/acks"
# After a failure, how long the leader waits for the others to read the outcome before
# it exits: its host's agent then ends, and with it the store they read from. (After a
# success the agent's exit barrier keeps the store up until every host is done.)
_ACK_TIMEOUT_S = 10.0


class Group:
    """This process's place in the job and the few collectives training needs.

    With ``world_size == 1`` (one host, one process) every operation is local.
    """

    def __init__(self, layout: Layout, local_rank: int = 0, settings: Settings | None = None,
                 store: dist.Store | None = None, watchdog: Watchdog | None = None):
        self.layout = layout
        self.local_rank = local_rank
        self.rank = layout.rank(local_rank)
        self.world_size = layout.world_size
        self.host = layout.cluster.current_host
        self.settings = settings or Settings()
        self.addresses: Mapping[str, str] = dict(self.settings.addresses)  # every host's, once launched
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
        for it (bounded by the watchdog; a dead leader is noticed at once, since
        its host's agent ends with it, and the store with the agent) and returns
        the leader's failure as its own, so all hosts end the same way. A rank's
        own failure is recorded for the launcher first, with its time. Returns
        the failure reason this rank should report, or None.
        """
        if not self.distributed:
            return failure
        assert self._store is not None
        if failure:
            record_failure(failure)
        try:
            if self.is_leader:
                self._store.set(_OUTCOME, json.dumps({"failure": failure}))
                if failure:  # a peer may be gone already: do not wait long for it
                    deadline = time.monotonic() + _ACK_TIMEOUT_S
                    while self._store.add(_ACKS, 0) < self.world_size - 1 and time.monotonic() < deadline:
                        time.sleep(0.1)
                self._stop_watchdog()
                return failure
            self._store.wait([_OUTCOME], datetime.timedelta(seconds=timeout_s))
            leader_failure = json.loads(self._store.get(_OUTCOME))["failure"]
            # Stop watching before the acknowledgement: once every rank has
            # acknowledged a failure, the leader's host may end, and its store with it.
            self._stop_watchdog()
            self._store.add(_ACKS, 1)
        except Exception as error:
            return failure or f"the leader host {self.leader_host} did not report its result: {short_error(error)}"
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
        return f"distributed training stopped on {self.label}: {what}; see that host's log. ({short_error(error, 200)})"


def join(layout: Layout, settings: Settings, local_rank: int = 0) -> Group:
    """This process's :class:`Group`; under torchrun's agent, after meeting every other rank.

    The agent's rendezvous has already brought the hosts together; here each
    process waits (bounded; the error names who did not come) until every
    rank has started, starts the heartbeat, then the process group.
    """
    if not layout.distributed:
        return Group(layout, local_rank, settings)
    cluster = layout.cluster
    rank = layout.rank(local_rank)
    if layout.use_cuda:
        torch.cuda.set_device(local_rank)
    rendezvous = datetime.timedelta(seconds=settings.rendezvous_timeout_s)
    # The store the agent of the master host serves (MASTER_ADDR/MASTER_PORT from the agent).
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=rendezvous)
    store.set(HEARTBEAT.format(rank=rank), "0")
    store.set(_JOINED.format(rank=rank), cluster.current_host)
    joined_keys = [_JOINED.format(rank=r) for r in range(layout.world_size)]
    try:
        store.wait(joined_keys, rendezvous)
    except Exception as error:
        try:
            missing = [r for r, key in enumerate(joined_keys) if not store.check([key])]
        except Exception:
            raise DistributedError(f"lost the master host {cluster.master} during the rendezvous: "
                                   f"{short_error(error)}") from None
        who = ", ".join(f"{layout.host_of(r)} (rank {r})" for r in missing)
        raise DistributedError(f"rendezvous timed out after {settings.rendezvous_timeout_s:.0f} s "
                               f"(KENNEL_DIST_RENDEZVOUS_TIMEOUT): {who} never joined; see "
                               f"{'its' if len(missing) == 1 else 'their'} log") from None
    # Watch the peers from here on: a master lost while the process group starts would
    # otherwise block this rank in the store until the rendezvous timeout.
    watchdog = Watchdog(store, rank, layout.world_size, layout.host_of, cluster.master,
                        settings.heartbeat_timeout_s, end_process)
    watchdog.start()
    dist.init_process_group(layout.backend, init_method="env://", rank=rank, world_size=layout.world_size,
                            timeout=datetime.timedelta(seconds=settings.collective_timeout_s),
                            device_id=torch.device("cuda", local_rank) if layout.use_cuda else None)
    group = Group(layout, local_rank, settings, store, watchdog)
    log.info("%s: joined (%s on %s)", group.label, layout.backend, cluster.network_interface or "default interface")
    return group


def parameter_digest(module: torch.nn.Module) -> str:
    """sha256 over the module's parameters (names and bytes): equal on ranks that hold the same model."""
    digest = hashlib.sha256()
    for name, parameter in sorted(Group.unwrap(module).named_parameters(), key=lambda item: item[0]):
        digest.update(name.encode())
        digest.update(parameter.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
