"""kennel's Locust users: the requests of a load test, for `kennel-loadtest` and for a
locustfile of your own (subclass them, add tasks, pass it with --locustfile).

    KennelHttpUser          POST a photo to an http(s) URL (the container's /invocations)
    SageMakerRuntimeUser    InvokeEndpoint on a SageMaker endpoint (boto3: SigV4, the region's runtime)

Both send back to back (a closed loop: a step with N users holds N requests
outstanding) and take their bodies and their permission to send from one
LoadPlan, so every step ends by itself at its deadline or its request cap and the
requests still in flight are waited for and counted. Importing this module
imports Locust, which monkey-patches the standard library for gevent: only the
load-test command imports it.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import gevent
from locust import FastHttpUser, User, constant, task

from kennel_ops.load.client import expect_json_200, transport_error

# InvokeEndpoint refuses a request body over 6 MB (SageMaker real-time endpoints' quota).
RUNTIME_PAYLOAD_LIMIT = 6 * 1024 * 1024
IDLE_S = 0.05  # how long a user waits before asking again once its step has ended


class AnswerError(Exception):
    """An answer that came back but does not count as a success (its message is the error's name)."""


@dataclass
class LoadPlan:
    """What the users send and whether they may send now. gevent runs one greenlet at a
    time, so the counters need no lock."""

    payloads: list[bytes]
    content_type: str = "image/jpeg"
    accept: str = "application/json"
    path: str = "/invocations"  # KennelHttpUser: the URL's path (the host is the environment's)
    endpoint: str | None = None  # SageMakerRuntimeUser: the endpoint name
    runtime: Any = None  # SageMakerRuntimeUser: a boto3 sagemaker-runtime client (shared, thread-safe)
    target_model: str | None = None  # SageMakerRuntimeUser: the model asked of a multi-model endpoint
    deadline: float = 0.0  # time.monotonic() after which no request starts
    left: int = 0  # requests this step may still start
    in_flight: int = 0
    sent: int = 0  # requests started over the whole run (picks the next body)
    precision: str | None = None  # X-Kennel-Precision of the last answer: the graph that served

    def open_step(self, duration_s: float, max_requests: int) -> None:
        self.deadline, self.left = time.monotonic() + duration_s, max_requests

    def close_step(self) -> None:
        self.left = 0

    def take(self) -> bytes | None:
        """The next body to send, or None when the step is over (deadline or cap)."""
        if self.left <= 0 or time.monotonic() >= self.deadline:
            return None
        self.left -= 1
        self.in_flight += 1
        self.sent += 1
        return self.payloads[self.sent % len(self.payloads)]

    def done(self) -> None:
        self.in_flight -= 1

    @contextmanager
    def request(self) -> Iterator[bytes | None]:
        """`with plan.request() as body:` the next body to send, counted in flight until the block
        ends; None (after a short idle wait) once the step is over: then send nothing."""
        body = self.take()
        if body is None:
            gevent.sleep(IDLE_S)
            yield None
            return
        try:
            yield body
        finally:
            self.done()


class KennelHttpUser(FastHttpUser):
    """POSTs the plan's photos to the environment's host + plan.path; 200 with JSON is a success."""

    abstract = True
    wait_time = constant(0)
    insecure = False  # an https endpoint's certificate is checked
    plan: LoadPlan

    @task
    def invoke(self) -> None:
        with self.plan.request() as body:
            if body is None:
                return
            with self.client.post(self.plan.path, data=body, name="invocations", catch_response=True,
                                  headers={"Content-Type": self.plan.content_type,
                                           "Accept": self.plan.accept}) as response:
                failed = getattr(response, "error", None)  # no HTTP answer: a transport error
                if failed is not None and not response.status_code:
                    # geventhttpclient wraps the socket's error (a timeout, a refusal) in RetriesExceeded
                    response.failure(transport_error(getattr(failed, "original", None) or failed))
                else:
                    problem = expect_json_200(response.status_code, response.content or b"")
                    if problem:
                        response.failure(problem)
                    else:
                        response.success()
                        self.plan.precision = response.headers.get("X-Kennel-Precision") or self.plan.precision


def runtime_error(error: Exception) -> str:
    """A short name for a failed InvokeEndpoint: the API's error code, and the model's own
    status for a ModelError (the container answered, but not 200)."""
    from botocore.exceptions import ClientError, ConnectTimeoutError, ReadTimeoutError

    if isinstance(error, ClientError):
        info = error.response.get("Error", {})
        status = error.response.get("OriginalStatusCode")
        return f"{info.get('Code', 'Error')}" + (f" http {status}" if status else "")
    if isinstance(error, (ReadTimeoutError, ConnectTimeoutError)):
        return "timeout"
    return transport_error(error)


class SageMakerRuntimeUser(User):
    """InvokeEndpoint with the plan's photos (boto3 signs with SigV4 and picks the region's
    runtime); fires Locust's request event like an HTTP user, so the report is the same."""

    abstract = True
    wait_time = constant(0)
    plan: LoadPlan

    @task
    def invoke(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        with self.plan.request() as body:
            if body is None:
                return
            started_at, began = time.time(), time.perf_counter()
            error: Exception | None = None
            length = 0
            try:
                target = {"TargetModel": self.plan.target_model} if self.plan.target_model else {}
                answer = self.plan.runtime.invoke_endpoint(EndpointName=self.plan.endpoint, Body=body,
                                                           ContentType=self.plan.content_type,
                                                           Accept=self.plan.accept, **target)
                data = answer["Body"].read()
                length = len(data)
                problem = expect_json_200(200, data)
                error = AnswerError(problem) if problem else None
            except (ClientError, BotoCoreError, OSError) as exc:
                error = AnswerError(runtime_error(exc))
        self.environment.events.request.fire(
            request_type="InvokeEndpoint", name=self.plan.endpoint, response_time=(time.perf_counter() - began) * 1000,
            response_length=length, response=None, context={}, exception=error, start_time=started_at, url=None)
