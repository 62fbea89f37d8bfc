"""Steps of load on Locust used as a library: one Environment and local runner, N users
per step, every request collected from Locust's request event into client.Outcome, so
stats.summarize and the ramp see a step as they always did.

A step ends at its deadline or its request cap, whichever first. The built-in users
(kennel_ops.load.users) stop starting requests then and the step waits for the ones in
flight (at most the request timeout), so every request sent is counted. Users of a
locustfile that do not use the LoadPlan are stopped by the runner at the same moment;
a request of theirs cut off then is not counted.
"""
from __future__ import annotations

import time

import gevent
import locust
from locust.env import Environment

from kennel_ops.load.client import Outcome, Run, transport_error
from kennel_ops.load.users import LoadPlan

POLL_S = 0.02


def error_name(exception: BaseException | None) -> str | None:
    """The Outcome error of a request event: the failure message the user gave, or a transport error's name."""
    if exception is None:
        return None
    if type(exception).__name__ in ("CatchResponseError", "AnswerError"):
        return str(exception) or type(exception).__name__
    return transport_error(exception)


def server_seconds(response) -> float | None:
    from kennel_ops.load.client import server_timing

    headers = getattr(response, "headers", None)
    return server_timing(headers.get("Server-Timing")) if headers is not None else None


class LocustSteps:
    """Runs steps of `users` concurrent users of `user_classes` against `host`."""

    def __init__(self, user_classes: list[type], plan: LoadPlan, request_timeout_s: float, host: str | None = None):
        for user_class in user_classes:
            user_class.plan = plan
        self.plan = plan
        self.request_timeout_s = request_timeout_s
        # locust.events: the listeners a locustfile registers with @events... are the run's own.
        self.environment = Environment(user_classes=user_classes, host=host, events=locust.events)
        self.runner = self.environment.create_local_runner()
        self._outcomes: list[Outcome] = []
        self._began_wall = 0.0
        self.environment.events.request.add_listener(self._on_request)

    def _on_request(self, response_time: float, exception: BaseException | None = None, start_time: float | None = None,
                    response=None, **_) -> None:
        latency = response_time / 1000.0
        started = (start_time - self._began_wall) if start_time else time.time() - self._began_wall - latency
        status = getattr(response, "status_code", None) or (0 if exception else 200)
        error = error_name(exception)
        self._outcomes.append(Outcome(max(0.0, started), latency, status, error,
                                      None if error else server_seconds(response)))

    def run(self, users: int, duration_s: float, max_requests: int) -> Run:
        """One step: `users` users sending for duration_s or max_requests requests."""
        if users < 1 or not duration_s > 0 or max_requests < 1:
            raise ValueError("a step needs at least one user, a positive duration and a request cap of 1 or more")
        self._outcomes = []
        self._began_wall, began = time.time(), time.monotonic()
        self.plan.open_step(duration_s, max_requests)
        self.runner.start(users, spawn_rate=users)
        while time.monotonic() < began + duration_s and self.plan.left > 0 and len(self._outcomes) < max_requests:
            gevent.sleep(POLL_S)
        self.plan.close_step()
        drain_until = time.monotonic() + self.request_timeout_s + 1.0
        while self.plan.in_flight > 0 and time.monotonic() < drain_until:
            gevent.sleep(POLL_S)
        self.runner.stop()
        return Run(sorted(self._outcomes, key=lambda o: o.start), began, time.monotonic(), concurrency=users)

    def close(self) -> None:
        self.runner.quit()
        self.environment.events.request.remove_listener(self._on_request)
