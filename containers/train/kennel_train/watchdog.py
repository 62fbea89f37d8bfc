"""A heartbeat between the training processes of every host, through the master's store.

torchrun's agent watches only the processes of its own host, and the static
rendezvous has no keep-alive, so a peer host that froze or lost its network is
noticed only by a collective's timeout (KENNEL_DIST_COLLECTIVE_TIMEOUT, 300 s),
and a rank waiting outside any collective (for the leader's export) is not
noticed at all. Each process publishes a counter to the store every few
seconds and watches everyone else's.
"""
from __future__ import annotations

import datetime
import logging
import os
import sys
import threading
import time
from typing import Callable

import torch.distributed as dist

from .cluster import short_error
from .launch import record_failure

log = logging.getLogger(__name__)

HEARTBEAT = "kennel/heartbeat/{rank}"
# A heartbeat value that means "finished on purpose": the watchdog stops watching that rank.
FINISHED = "finished"


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
                self._store.set(HEARTBEAT.format(rank=self._rank), FINISHED)
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
                self._store.set(HEARTBEAT.format(rank=self._rank), str(beat))
                result.append(self._store.multi_get(keys))
            except Exception as error:
                result.append(error)

        caller = threading.Thread(target=call, name="kennel-heartbeat-call", daemon=True)
        caller.start()
        caller.join(self._timeout_s)
        if not result:
            raise TimeoutError(f"no answer for {self._timeout_s:.0f} s (KENNEL_DISTHEARTBEAT_TIMEOUT)")
        if isinstance(result[0], Exception):
            raise result[0]
        return result[0]

    def run(self) -> None:
        peers = [rank for rank in range(self._world_size) if rank != self._rank]
        keys = [HEARTBEAT.format(rank=rank) for rank in peers]
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
                                  f"{short_error(error)}; it stopped, froze or lost its network, see its log")
                return
            now = time.monotonic()
            for rank, value in zip(peers, values, strict=True):
                if value == FINISHED.encode():
                    last_change[rank] = float("inf")
                elif value != last_value.get(rank):
                    last_value[rank], last_change[rank] = value, now
                elif now - last_change[rank] > self._timeout_s and not self._stopping.is_set():
                    self._on_lost(f"host {self._host_of(rank)} (rank {rank}) sent no heartbeat for "
                                  f"{self._timeout_s:.0f} s (KENNEL_DISTHEARTBEAT_TIMEOUT): it stopped, "
                                  "froze or lost its network")
                    return


def end_process(reason: str) -> None:
    """Record ``reason`` as this process's failure and end it now (the watchdog's ``on_lost``)."""
    log.error("%s", reason)
    record_failure(reason)
    for handler in logging.getLogger("kennel_train").handlers + logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    # The main thread may be blocked inside a collective: nothing short of
    # ending the process gets it out, and its peers see the connection close.
    os._exit(1)
