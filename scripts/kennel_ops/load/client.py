"""Small bounded HTTP clients for one endpoint: the resilience tests' and the
benchmarks' instrument (kennel-loadtest runs on Locust: users.py, locust_steps.py).
They need what a Locust ramp does not give: an open loop that charges a request the
wait from its scheduled time, and per-request start times around a fault.

Two shapes of load, both bounded by a request count AND a duration, both ending
by themselves (a request in flight at the deadline gets at most its timeout):

- closed loop (run_closed_loop): N clients, each sending its next request as
  soon as the previous answer arrives. The achieved rate at concurrency N is
  what the endpoint sustains with N requests outstanding; the ramp of the load
  test is made of these.
- open loop (run_open_loop): requests scheduled at a fixed rate whatever the
  answers do. Latency is measured from the scheduled time, so a server (or a
  client) that falls behind shows up as latency instead of quietly lowering the
  rate (no coordinated omission). The resilience checks use this shape.

Plain threads and http.client with one keep-alive connection per client: the
generator costs well under a millisecond of CPU per request, so on a small host
it takes little from the server it measures. Requests go only to the URL given.
"""
from __future__ import annotations

import http.client
import itertools
import json
import math
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Callable, Sequence

DEFAULT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Outcome:
    """One request: when it started (s since the run began), how long it took, what came back."""

    start: float
    latency: float
    status: int  # 0 when no HTTP answer came back
    error: str | None = None  # None for a success, else a short reason ("http 503", "timeout", ...)
    server_s: float | None = None  # the server's own time for it (Server-Timing: worker), when it says

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Run:
    """The outcomes of one bounded run and its wall-clock window (time.monotonic)."""

    outcomes: list[Outcome]
    began: float
    ended: float
    concurrency: int | None = None
    offered_rate: float | None = None

    @property
    def elapsed(self) -> float:
        return self.ended - self.began


Validator = Callable[[int, bytes], "str | None"]


def expect_json_200(status: int, body: bytes) -> str | None:
    """The default success check: HTTP 200 with a JSON body."""
    if status != 200:
        return f"http {status}"
    try:
        json.loads(body)
    except ValueError:
        return "200 with a body that is not JSON"
    return None


@dataclass(frozen=True)
class Target:
    """Where requests go: an http(s) URL to POST bodies to."""

    url: str
    content_type: str = "image/jpeg"
    accept: str = "application/json"
    timeout_s: float = DEFAULT_TIMEOUT_S
    scheme: str = field(init=False)
    host: str = field(init=False)
    port: int = field(init=False)
    path: str = field(init=False)

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {self.url!r}")
        object.__setattr__(self, "scheme", parts.scheme)
        object.__setattr__(self, "host", parts.hostname)
        object.__setattr__(self, "port", parts.port or (443 if parts.scheme == "https" else 80))
        path = parts.path or "/"
        object.__setattr__(self, "path", path + (f"?{parts.query}" if parts.query else ""))

    def with_path(self, path: str) -> "Target":
        """The same server, another path (the /ping of an /invocations URL)."""
        base = urllib.parse.urlsplit(self.url)
        return Target(urllib.parse.urlunsplit((base.scheme, base.netloc, path, "", "")),
                      self.content_type, self.accept, self.timeout_s)


class Connection:
    """One keep-alive connection that reconnects after any failure."""

    def __init__(self, target: Target):
        self.target = target
        self._conn: http.client.HTTPConnection | None = None
        self.last_headers: http.client.HTTPMessage | None = None  # of the last answer

    def _open(self) -> http.client.HTTPConnection:
        if self._conn is None:
            t = self.target
            if t.scheme == "https":
                self._conn = http.client.HTTPSConnection(t.host, t.port, timeout=t.timeout_s,
                                                         context=ssl.create_default_context())
            else:
                self._conn = http.client.HTTPConnection(t.host, t.port, timeout=t.timeout_s)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(self, method: str, body: bytes | None = None,
                headers: dict[str, str] | None = None, path: str | None = None) -> tuple[int, bytes]:
        """Send one request; (status, body). Raises OSError/HTTPException on a transport failure."""
        conn = self._open()
        self.last_headers = None
        try:
            conn.request(method, path or self.target.path, body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
            self.last_headers = response.msg
            if response.will_close:
                self.close()
            return response.status, data
        except BaseException:
            self.close()
            raise

    def post(self, body: bytes) -> tuple[int, bytes]:
        return self.request("POST", body, {"Content-Type": self.target.content_type,
                                           "Accept": self.target.accept})


def transport_error(exc: BaseException) -> str:
    """A short name for why no HTTP answer came back."""
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected)):
        return "connection reset"
    return type(exc).__name__


def server_timing(header: str | None, metric: str = "worker") -> float | None:
    """Seconds that a W3C Server-Timing header gives for `metric` ("worker;dur=43.1" is
    milliseconds), or None when the header or the metric is missing or malformed."""
    for entry in (header or "").split(","):
        name, *params = (part.strip() for part in entry.split(";"))
        if name != metric:
            continue
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "dur":
                try:
                    duration = float(value.strip().strip('"'))
                except ValueError:
                    return None
                return duration / 1000.0 if math.isfinite(duration) and duration >= 0 else None
    return None


def timed_post(conn: Connection, body: bytes, validate: Validator) -> tuple[float, int, str | None, float | None]:
    """(seconds, status, error, the server's own seconds when it says) of one POST."""
    began = time.perf_counter()
    try:
        status, data = conn.post(body)
    except (OSError, http.client.HTTPException) as exc:
        return time.perf_counter() - began, 0, transport_error(exc), None
    elapsed = time.perf_counter() - began
    headers = conn.last_headers
    return elapsed, status, validate(status, data), server_timing(headers.get("Server-Timing") if headers else None)


class _Tickets:
    """Hands out request numbers 0, 1, ... up to a limit, across threads."""

    def __init__(self, limit: int):
        self._limit = limit
        self._counter = itertools.count()
        self._lock = threading.Lock()

    def take(self) -> int | None:
        with self._lock:
            n = next(self._counter)
        return n if n < self._limit else None


def _check_bounds(duration_s: float, max_requests: int) -> None:
    if not duration_s > 0:
        raise ValueError("duration_s must be positive")
    if max_requests < 1:
        raise ValueError("max_requests must be at least 1")


def run_closed_loop(target: Target, payloads: Sequence[bytes], concurrency: int, duration_s: float,
                    max_requests: int, validate: Validator = expect_json_200) -> Run:
    """concurrency clients sending back to back until duration_s or max_requests, whichever first."""
    _check_bounds(duration_s, max_requests)
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    if not payloads:
        raise ValueError("no payloads")
    tickets = _Tickets(max_requests)
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    began = time.monotonic()
    deadline = began + duration_s

    def client() -> None:
        conn = Connection(target)
        mine = []
        try:
            while time.monotonic() < deadline:
                n = tickets.take()
                if n is None:
                    break
                start = time.monotonic() - began
                latency, status, error, server_s = timed_post(conn, payloads[n % len(payloads)], validate)
                mine.append(Outcome(start, latency, status, error, server_s))
        finally:
            conn.close()
            with lock:
                outcomes.extend(mine)

    _run_threads(client, concurrency)
    outcomes.sort(key=lambda o: o.start)
    return Run(outcomes, began, time.monotonic(), concurrency=concurrency)


def run_open_loop(target: Target, payloads: Sequence[bytes], rate: float, duration_s: float,
                  max_requests: int | None = None, clients: int = 32,
                  validate: Validator = expect_json_200) -> Run:
    """rate requests/s, evenly spaced, for duration_s (at most max_requests), from up to `clients` connections.

    An outcome's start is its scheduled time and its latency runs from there, so
    when every client is busy the wait for a free one counts as latency.
    """
    if not rate > 0:
        raise ValueError("rate must be positive")
    planned = max(1, int(rate * duration_s))
    max_requests = planned if max_requests is None else min(planned, max_requests)
    _check_bounds(duration_s, max_requests)
    if not payloads:
        raise ValueError("no payloads")
    tickets = _Tickets(max_requests)
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    began = time.monotonic()
    hard_stop = began + duration_s + target.timeout_s  # a backlog never outlives the run by more

    def client() -> None:
        conn = Connection(target)
        mine = []
        try:
            while True:
                n = tickets.take()
                if n is None:
                    break
                scheduled = n / rate
                now = time.monotonic()
                if now > hard_stop:
                    mine.append(Outcome(scheduled, now - began - scheduled, 0, "not sent: client backlog"))
                    continue
                if began + scheduled > now:
                    time.sleep(began + scheduled - now)
                sent = time.monotonic() - began
                latency, status, error, server_s = timed_post(conn, payloads[n % len(payloads)], validate)
                mine.append(Outcome(scheduled, sent - scheduled + latency, status, error, server_s))
        finally:
            conn.close()
            with lock:
                outcomes.extend(mine)

    _run_threads(client, max(1, min(clients, max_requests)))
    outcomes.sort(key=lambda o: o.start)
    return Run(outcomes, began, time.monotonic(), offered_rate=rate)


def _run_threads(work: Callable[[], None], count: int) -> None:
    threads = [threading.Thread(target=work, name=f"kennel-load-{i}", daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def warm_up(target: Target, payloads: Sequence[bytes], requests: int, concurrency: int = 2) -> Run:
    """A few requests before measuring (first-request costs: connections, allocator, caches)."""
    return run_closed_loop(target, payloads, concurrency, duration_s=max(10.0, target.timeout_s),
                           max_requests=requests)


def wait_until_healthy(ping: Target, timeout_s: float, interval_s: float = 0.5) -> float:
    """Poll GET ping until 200; seconds it took. TimeoutError with the last answer seen otherwise."""
    began = time.monotonic()
    last = "no answer"
    conn = Connection(Target(ping.url, timeout_s=min(5.0, timeout_s)))
    try:
        while time.monotonic() - began < timeout_s:
            try:
                status, _ = conn.request("GET")
                if status == 200:
                    return time.monotonic() - began
                last = f"http {status}"
            except (OSError, http.client.HTTPException) as exc:
                last = transport_error(exc)
            time.sleep(interval_s)
    finally:
        conn.close()
    raise TimeoutError(f"{ping.url} not healthy after {timeout_s:.0f} s (last: {last})")
