"""Draining on SIGTERM: /ping turns 503, requests in flight finish, then MMS may stop.

Works around (sagemaker-inference 1.10.1, multi-model-server 1.1.11): nothing there
waits for requests in flight. The toolkit forwards SIGTERM to MMS at once
(model_server._add_sigterm_handler), MMS's JVM then shuts down with the requests it
holds cut off, and MMS's /ping has no state between healthy and gone. Here the
launcher creates the "draining" file (the /ping plugin then answers 503, so the load
balancer stops sending work) and waits until every worker's busy flag (activity.py)
has been idle for QUIET_PERIOD_S, at most KENNEL_DRAIN_TIMEOUT_S; only then is MMS
stopped (supervisor.stop_mms).

Proved by: tests/contract/test_serve_lifecycle.py::test_sigterm_drains_in_flight_requests_and_exits_within_30_s,
tests/unit/test_serve_activity.py::test_drain_waits_for_busy_workers_and_fails_ping_first.
"""
from __future__ import annotations

import logging
import time

from kennel_serve.mms_toolkit import activity
from kennel_serve.settings import ServeSettings

log = logging.getLogger("kennel_serve")

QUIET_PERIOD_S = 0.5  # all workers idle this long = nothing queued in the JVM either


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
