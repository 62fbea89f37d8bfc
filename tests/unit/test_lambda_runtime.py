"""The handler over real HTTP: botocore -> kennel-local-runtime (kennel_ops/local_runtime.py) -> a container's /invocations.

The container here is a small HTTP server of the test's own that answers what
each test tells it to, so that every failure a real container can produce is
reached; tests/container/test_lambda_integration.py runs the same path against
the real serving image.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import kennel_lambda
from kennel_ops.local_runtime import LocalRuntime

ENDPOINT = "kennel-local"
SCORES = [[0.25, -1.5, 2.0]]
JPEG = b"\xff\xd8\xff\xe0" + bytes(64)


class FakeContainer:
    """A real HTTP server on 127.0.0.1 answering POST /invocations as told; it records each request."""

    def __init__(self) -> None:
        self.status, self.body, self.content_type, self.delay_s = 200, json.dumps(SCORES).encode(), "application/json", 0.0
        self.requests: list[dict] = []
        container = self

        class Handler(BaseHTTPRequestHandler):
            disable_nagle_algorithm = True

            def log_message(self, *_args) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                container.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                time.sleep(container.delay_s)
                self.send_response(container.status)
                self.send_header("Content-Type", container.content_type)
                self.send_header("Content-Length", str(len(container.body)))
                self.end_headers()
                self.wfile.write(container.body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d" % self.server.server_address[1]

    def answer(self, status: int, body, content_type: str = "application/json", delay_s: float = 0.0) -> None:
        self.status, self.content_type, self.delay_s = status, content_type, delay_s
        self.body = body if isinstance(body, bytes) else json.dumps(body).encode()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Context:
    def __init__(self, remaining_ms: int) -> None:
        self.remaining_ms = remaining_ms

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


@pytest.fixture
def container():
    fake = FakeContainer()
    yield fake
    fake.close()


@pytest.fixture
def runtime(container, monkeypatch):
    with LocalRuntime(container.url, [ENDPOINT], timeout_s=5.0) as local:
        monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", local.url)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "local")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.setenv("ENDPOINT_NAME", ENDPOINT)
        monkeypatch.setattr(kennel_lambda, "_client", None)
        monkeypatch.setattr(kennel_lambda, "_plan", None)
        yield local


def call(event, remaining_ms: int = 30_000) -> tuple[int, dict, object]:
    response = kennel_lambda.handler(event, Context(remaining_ms))
    assert response["headers"]["Content-Type"] == "application/json"
    return response["statusCode"], response["headers"], json.loads(response["body"])


def test_scores_come_back_unchanged_and_headers_reach_the_container(runtime, container):
    status, _, body = call({"url": "https://example.com/dog.jpg"})
    assert (status, body) == (200, SCORES)
    sent = container.requests[-1]
    assert sent["path"] == "/invocations"
    assert sent["headers"]["Content-Type"] == "application/json"
    assert sent["headers"]["Accept"] == "application/json"
    assert json.loads(sent["body"]) == {"url": "https://example.com/dog.jpg"}
    assert "X-Amzn-SageMaker-Custom-Attributes" not in sent["headers"]


def test_image_bytes_and_top_k_reach_the_container(runtime, container):
    container.answer(200, [{"breed": "Akita", "probability": 0.8}])
    status, _, body = call({"image": "data:image/jpeg;base64," + __import__("base64").b64encode(JPEG).decode(),
                            "top_k": 1})
    assert status == 200 and body == [{"breed": "Akita", "probability": 0.8}]
    sent = container.requests[-1]
    assert sent["body"] == JPEG and sent["headers"]["Content-Type"] == "image/jpeg"
    assert sent["headers"]["X-Amzn-SageMaker-Custom-Attributes"] == "top_k=1"


def test_the_containers_4xx_comes_back_with_its_status_and_message(runtime, container):
    container.answer(415, {"error": "Content-Type text/csv is not supported"})
    status, _, body = call({"image": "aGVsbG8=", "content_type": "text/csv"})
    assert (status, body) == (415, {"error": "Content-Type text/csv is not supported"})


def test_the_containers_5xx_is_502_and_not_retried(runtime, container):
    container.answer(500, b"Traceback (most recent call last): ...", content_type="text/plain")
    status, _, body = call({"url": "https://example.com/dog.jpg"})
    assert status == 502 and "Traceback" not in json.dumps(body)
    assert len(container.requests) == 1  # a ModelError is the model's answer, not a transient fault


def test_a_container_slower_than_the_runtime_allows_is_504(runtime, container, monkeypatch):
    monkeypatch.setattr(runtime, "timeout_s", 0.3)
    container.answer(200, SCORES, delay_s=1.0)
    status, _, body = call({"url": "https://example.com/dog.jpg"})
    assert status == 504 and "in time" in body["error"]


def test_a_container_slower_than_the_function_allows_is_504(runtime, container):
    # 3 s left: one attempt, read timeout about 2.4 s; the container takes 4 s.
    container.answer(200, SCORES, delay_s=4.0)
    started = time.monotonic()
    status, _, _ = call({"url": "https://example.com/dog.jpg"}, remaining_ms=3000)
    assert status == 504
    assert time.monotonic() - started < 3.0  # answered before the function's own timeout


def test_an_unknown_endpoint_is_502_naming_it(runtime, monkeypatch):
    monkeypatch.setenv("ENDPOINT_NAME", "no-such-endpoint")
    status, _, body = call({"url": "https://example.com/dog.jpg"})
    assert status == 502 and "no-such-endpoint" in body["error"]


def test_an_unreachable_container_is_retried_then_503(runtime, container):
    container.close()
    status, headers, _ = call({"url": "https://example.com/dog.jpg"}, remaining_ms=30_000)
    assert status == 503 and headers["Retry-After"] == "1"
    assert kennel_lambda._plan.attempts == 3


def test_a_retry_that_would_outlive_the_function_is_not_made(runtime, container):
    call({"url": "https://example.com/dog.jpg"}, remaining_ms=60_000)  # the client is sized for 60 s
    container.close()
    started = time.monotonic()
    status, _, _ = call({"url": "https://example.com/dog.jpg"}, remaining_ms=3000)  # this call has 3 s
    assert status == 503
    assert time.monotonic() - started < 2.5


def test_the_runtime_refuses_unsigned_requests_and_bodies_over_6_mb(runtime):
    import http.client
    connection = http.client.HTTPConnection(*runtime.url[len("http://"):].split(":"))
    connection.request("POST", f"/endpoints/{ENDPOINT}/invocations", body=b"{}",
                       headers={"Content-Type": "application/json"})
    reply = connection.getresponse()
    assert reply.status == 403 and reply.getheader("x-amzn-ErrorType").startswith("MissingAuthenticationToken")
    reply.read()
    connection.request("POST", f"/endpoints/{ENDPOINT}/invocations", body=bytes(6_291_457),
                       headers={"Content-Type": "image/jpeg", "Authorization": "AWS4-HMAC-SHA256 Credential=x"})
    reply = connection.getresponse()
    assert reply.status == 413 and b"exceeds" in reply.read()
    connection.close()


def test_a_target_model_on_a_single_model_endpoint_is_a_validation_error(runtime, container):
    import boto3
    import botocore.exceptions

    client = boto3.client("sagemaker-runtime")
    with pytest.raises(botocore.exceptions.ClientError, match="ValidationError.*not a multi-model endpoint"):
        client.invoke_endpoint(EndpointName=ENDPOINT, TargetModel="dogs.tar.gz", Body=b"x", ContentType="image/jpeg")
