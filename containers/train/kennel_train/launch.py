"""This host's training processes, started by torchrun's elastic agent; their outcome as one exit code and reason.

torch.distributed.launcher (what ``torchrun`` runs) does the generic part: a
static rendezvous on the master host's port (the agent of node 0 serves the
TCPStore that every process then uses), one process per GPU with RANK,
LOCAL_RANK, WORLD_SIZE and MASTER_ADDR/MASTER_PORT in its environment,
watching them, ending the others on this host when one fails, passing SIGTERM
on, and an exit barrier that keeps the master's store up until every host is
done. What remains here is SageMaker's part:

* the peers' DNS names, which SageMaker registers while the job starts, are
  waited for (bounded) before the rendezvous, which would otherwise fail at once;
* one failure reason: every process records its reason in the error file the
  agent gives it (TORCHELASTIC_ERROR_FILE, the file ``@record`` writes) when
  the failure happens; the earliest is the root cause, later ones its echoes;
* the exit code: 128 + the signal for a stop, as a shell reports it;
* rendezvous errors told in the job's terms: which host, which setting.
"""
from __future__ import annotations

import ctypes
import dataclasses
import logging
import math
import os
import re
import signal
import tempfile
from pathlib import Path
from typing import Any, Callable

from torch.distributed import DistNetworkError
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ErrorHandler, ProcessFailure
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from .cluster import Layout, Settings, resolve_hosts, set_network_interface, short_error
from .failure import one_line

log = logging.getLogger(__name__)

# A target runs as target(local_rank, layout, settings, *args) and returns (exit code, failure reason or None).
Target = Callable[..., "tuple[int, str | None]"]

# SageMaker sends SIGKILL 120 s after SIGTERM: the processes get most of that to checkpoint and agree.
_STOP_GRACE_S = 100
_MONITOR_INTERVAL_S = 0.5
# SIGINT is turned into SIGTERM before the agent sees it (see _stop_on_signal): it must not pass SIGINT on.
_AGENT_SIGNALS = "SIGTERM,SIGHUP,SIGQUIT"
_PR_SET_PDEATHSIG = 1


class _Reason(Exception):
    """A training process's failure reason, in the form the agent's error file holds it."""


def record_failure(reason: str) -> None:
    """Record this process's failure reason for the launcher (outside the agent: nothing to do).

    Called when the failure happens, not when the process ends: a rank that
    waits for its peers before it exits would otherwise look later than the
    consequences of its own failure.
    """
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        ErrorHandler().record_exception(_Reason(one_line(reason)))


def launch(target: Target, layout: Layout, settings: Settings, args: tuple = ()) -> tuple[int, str | None]:
    """Run ``target`` in every process of this host; return (exit code, the one failure reason or None).

    One process (one host, no GPU or one): called here, no agent. More: the
    peers' names resolved (bounded), then torchrun's agent starts and watches
    the processes; ``settings.addresses`` reaches them with every host's address.
    """
    if not layout.distributed:
        return target(0, layout, settings, *args)
    cluster = layout.cluster
    # The agent installs handlers for its signals and leaves them: they are put back after it.
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                                                                 signal.SIGQUIT)}
    signal.signal(signal.SIGTERM, _stop_on_signal)
    signal.signal(signal.SIGINT, _stop_on_signal)
    master = f"{cluster.master} (port {settings.port})"
    try:
        set_network_interface(cluster.network_interface, layout.use_cuda)
        settings = dataclasses.replace(settings, addresses=resolve_hosts(cluster.hosts, settings))
        master = f"{cluster.master} ({settings.addresses[cluster.master]}:{settings.port})"
        log.info("starting %d of %d ranks on %s (%s, master %s)", layout.processes_per_host, layout.world_size,
                 cluster.current_host, layout.backend, master)
        with tempfile.TemporaryDirectory(prefix="kennel-torchrun-") as log_dir:
            try:
                elastic_launch(_config(layout, settings, log_dir), _run_process)(target, layout, settings, args)
                return 0, None
            except ChildFailedError as error:
                rank, first = error.get_first_failure()
                code = first.exitcode if first.exitcode > 0 else 128 - first.exitcode
                how = f"signal {first.signal_name()}" if first.exitcode < 0 else f"exit code {first.exitcode}"
                return code, _root_cause(log_dir) or (
                    f"the training process of rank {rank} on {cluster.current_host} ended with {how} without "
                    "reporting why; see this host's log")
            except SignalException as error:
                return 128 + error.sigval, _root_cause(log_dir) or _stopped_early(error)
            except Exception as error:  # the agent's rendezvous
                return 1, _rendezvous_failure(error, layout, settings, master)
    except SignalException as error:
        return 128 + error.sigval, _stopped_early(error)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _config(layout: Layout, settings: Settings, log_dir: str) -> LaunchConfig:
    cluster = layout.cluster
    hosts = len(cluster.hosts)
    return LaunchConfig(
        min_nodes=hosts, max_nodes=hosts, nproc_per_node=layout.processes_per_host, run_id="kennel",
        rdzv_backend="static", rdzv_endpoint=f"{settings.addresses[cluster.master]}:{settings.port}",
        rdzv_configs={"rank": cluster.node_rank, "timeout": math.ceil(settings.rendezvous_timeout_s)},
        max_restarts=0,  # a restart is a new SageMaker job, which resumes from the checkpoint
        monitor_interval=_MONITOR_INTERVAL_S, start_method="spawn",  # CUDA cannot fork
        logs_specs=DefaultLogsSpecs(log_dir=log_dir), signals_to_handle=_AGENT_SIGNALS,
        shutdown_timeout=_STOP_GRACE_S)


def _stop_on_signal(signum: int, _frame: Any) -> None:
    # SIGINT from a terminal reaches every process of the group: the processes see
    # it themselves, and the agent passes on SIGTERM (once) rather than a second SIGINT,
    # which they would take as "stop at once, no checkpoint".
    raise SignalException(f"received {signal.Signals(signum).name}", signal.SIGTERM)


def _stopped_early(error: SignalException) -> str:
    return f"stopped by {error.sigval.name} before training started; nothing to save yet"


def _run_process(target: Target, layout: Layout, settings: Settings, args: tuple) -> None:
    """One training process under the agent: it exits with the target's code, its reason recorded."""
    # A process must not outlive its agent (killed with its host): nothing would watch it then.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    except (OSError, AttributeError):
        pass  # not Linux: the agent's own shutdown still ends it
    code, reason = target(int(os.environ["LOCAL_RANK"]), layout, settings, *args)
    if code:
        error_file = os.environ.get("TORCHELASTIC_ERROR_FILE", "")
        if not (error_file and Path(error_file).is_file()):
            record_failure(reason or f"exit code {code}")
        raise SystemExit(code)


def _root_cause(log_dir: str) -> str | None:
    """The earliest reason any process of this host recorded (on a tie the lowest local rank: the leader)."""
    recorded = []
    for path in Path(log_dir).glob("*/attempt_*/*/error.json"):
        try:
            failure = ProcessFailure(local_rank=int(path.parent.name), pid=0, exitcode=1, error_file=str(path))
        except Exception:
            continue  # half written when its process was killed
        message = failure.message.get("message", "") if isinstance(failure.message, dict) else failure.message
        recorded.append((failure.timestamp, failure.local_rank, str(message)))
    if not recorded:
        return None
    message = min(recorded)[2]
    prefix = f"{_Reason.__name__}: "
    return message[len(prefix):] if message.startswith(prefix) else one_line(f"internal error: {message}")


def _rendezvous_failure(error: Exception, layout: Layout, settings: Settings, master: str) -> str:
    cluster = layout.cluster
    text = short_error(error)
    within = f"{settings.rendezvous_timeout_s:.0f} s (KENNEL_DIST_RENDEZVOUS_TIMEOUT)"
    joined = re.search(r"(\d+)/\d+ clients joined", text)
    if joined:
        # The master's store counts the hosts that connected, not which: name them when that says who.
        others = cluster.hosts[1:]
        missing = len(cluster.hosts) - int(joined.group(1))
        if missing >= len(others):
            who, whose = ", ".join(_host_ranks(layout, host) for host in others), "its" if len(others) == 1 else "their"
        else:
            who, whose = f"{missing} of {', '.join(others)}", "their"
        return f"rendezvous timed out after {within}: {who} never joined; see {whose} log"
    if re.search(r"EADDRINUSE|failed to listen|bind", text, re.IGNORECASE):
        return f"cannot listen for the other hosts on {master}: {text} (KENNEL_DIST_PORT chooses the port)"
    if isinstance(error, DistNetworkError) and re.search(r"trying to connect|connect\(\)|refused", text):
        return f"cannot reach the master host {master} within {within}: {text}; see the master's log"
    if isinstance(error, DistNetworkError) and cluster.node_rank != 0:
        return f"lost the master host {master} during the rendezvous: {text}; see the master's log"
    return one_line(f"the training processes did not start on {cluster.current_host}: {type(error).__name__}: {text}")


def _host_ranks(layout: Layout, host: str) -> str:
    first = layout.cluster.hosts.index(host) * layout.processes_per_host
    if layout.processes_per_host == 1:
        return f"{host} (rank {first})"
    return f"{host} (ranks {first}-{first + layout.processes_per_host - 1})"
