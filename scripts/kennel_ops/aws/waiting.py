"""Waiting for long AWS operations with visible progress.

botocore's waiters are silent for up to an hour; this loop prints every status
change (with the elapsed time) and a heartbeat while nothing changes, and ends
with a CliError naming the failure reason when the resource fails.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from kennel_ops.aws.context import CliError, Console


@dataclass(frozen=True)
class Poll:
    """How often to look and for how long."""

    interval_s: float = 15.0
    timeout_s: float = 3600.0
    heartbeat_s: float = 120.0


def elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def wait_for(what: str, describe: Callable[[], dict], *, status: Callable[[dict], str],
             done: set[str], failed: set[str], console: Console, poll: Poll,
             detail: Callable[[dict], str] | None = None,
             reason: Callable[[dict], str] | None = None,
             clock: Callable[[], float] = time.monotonic,
             sleep: Callable[[float], None] = time.sleep) -> dict:
    """Describe until the status is in `done` (returns the description) or `failed`.

    detail(description) adds text to each progress line (e.g. a secondary status);
    reason(description) is the failure reason put in the error line.
    """
    start = clock()
    last_line, last_print = None, start
    while True:
        description = describe()
        state = status(description)
        line = state + (f" ({detail(description)})" if detail and detail(description) else "")
        now = clock()
        if line != last_line or now - last_print >= poll.heartbeat_s:
            console.note(f"[{elapsed(now - start)}] {what}: {line}")
            last_line, last_print = line, now
        if state in done:
            return description
        if state in failed:
            why = reason(description) if reason else ""
            raise CliError(f"{what} is {state}" + (f": {why}" if why else ""))
        if now - start >= poll.timeout_s:
            raise CliError(f"{what} still {state} after {elapsed(now - start)}; it goes on in AWS, "
                           "run the command again to keep waiting")
        sleep(poll.interval_s)
