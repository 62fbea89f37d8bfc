"""A local stand-in for the SageMaker runtime API in front of a serving container.

    kennel-local-runtime --container-url http://127.0.0.1:8080 [--endpoint kennel-local] [--port 8081]

It answers InvokeEndpoint (``POST /endpoints/<name>/invocations``) the way the
real runtime does, so that boto3/botocore clients (the Lambda function,
notebooks) run unchanged against a container on this machine:

    export AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME=http://127.0.0.1:8081
    export AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local AWS_DEFAULT_REGION=us-east-1

- the body and the Content-Type, Accept and X-Amzn-SageMaker-Custom-Attributes
  headers go to the container's ``/invocations``; its 2xx answer comes back
  with its Content-Type (and custom attributes, if it set any);
- the container's 4xx/5xx becomes HTTP 424 ``ModelError`` with
  OriginalStatusCode/OriginalMessage, as the runtime sends it;
- a container that takes longer than --timeout (60 s, SageMaker's limit) gives
  the runtime's ModelError "Received server error (0) ... timed out";
- an unreachable container is 503 ServiceUnavailable; an unknown endpoint name
  is 400 ValidationError "... not found"; an unsigned request 403, a body over
  6 MB 413, as the runtime answers them.

With --multi-model it stands in for a multi-model endpoint, as SageMaker drives
one: InvokeEndpoint must name a TargetModel (``NAME.tar.gz``), whose folder is
``--models-root``/NAME/model in the container (SageMaker downloads and extracts it
there); a model not loaded yet is loaded first (``POST /models``), and a 507
unloads the least recently used model and loads again. The request then goes to
``/models/NAME/invoke``. A TargetModel sent to a single-model endpoint, or none to a
multi-model one, is a 400 ValidationError.

Requests are not authenticated beyond requiring a SigV4 Authorization header:
it binds to 127.0.0.1 only. Standard library only.
"""
from __future__ import annotations

import argparse
import http.client
import json
import re
import socket
import sys
import threading
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterable

ACCOUNT = "000000000000"
REGION = "us-east-1"
VARIANT = "AllTraffic"
CONTAINER_NAME = "primary"
MAX_BODY_BYTES = 6_291_456  # InvokeEndpoint's limit
CONTAINER_TIMEOUT_S = 60.0  # what SageMaker allows a container per invocation
FORWARDED_HEADERS = ("Content-Type", "Accept", "X-Amzn-SageMaker-Custom-Attributes")
TARGET_MODEL_HEADER = "X-Amzn-SageMaker-Target-Model"
_TARGET_MODEL = re.compile(r"^([A-Za-z0-9](?:[A-Za-z0-9._-]{0,98}[A-Za-z0-9])?)\.tar\.gz$")
_INVOCATIONS = re.compile(r"^/endpoints/([^/]+)/invocations$")
_MODEL_ERROR = "ModelError:http://internal.amazon.com/coral/com.amazon.sagemaker/"
_TIMED_OUT = (f"Your invocation timed out while waiting for a response from container {CONTAINER_NAME}. "
              "Review the latency metrics for each container in Amazon CloudWatch, resolve the issue, and try again.")


class LocalRuntime:
    """The server, startable in-process (tests, smoke) or from the command line."""

    def __init__(self, container_url: str, endpoints: Iterable[str] = ("kennel-local",),
                 host: str = "127.0.0.1", port: int = 0, timeout_s: float = CONTAINER_TIMEOUT_S,
                 log_requests: bool = False, multi_model: bool = False,
                 models_root: str = "/opt/ml/models") -> None:
        target = urllib.parse.urlsplit(container_url)
        if target.scheme != "http" or not target.hostname:
            raise ValueError(f"container URL must be http://HOST:PORT, got {container_url!r}")
        self.container = (target.hostname, target.port or 80)
        self.endpoints = frozenset(endpoints)
        self.timeout_s = timeout_s
        self.log_requests = log_requests
        self.multi_model = multi_model
        self.models_root = models_root.rstrip("/")
        self.loaded: list[str] = []  # multi-model: least recently used first
        self.models_lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, port), _handler_class(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "LocalRuntime":
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="local-runtime", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> "LocalRuntime":
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def serve_forever(self) -> None:
        self._server.serve_forever()


def _handler_class(runtime: LocalRuntime) -> type[BaseHTTPRequestHandler]:
    class Handler(_RuntimeHandler):
        pass

    Handler.runtime = runtime
    return Handler


class _RuntimeHandler(BaseHTTPRequestHandler):
    runtime: LocalRuntime
    protocol_version = "HTTP/1.1"
    server_version = "kennel-local-runtime"
    # Headers and body leave in separate writes: without this, Nagle's algorithm and
    # the client's delayed ACK hold every answer back by about 40 ms.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        if self.runtime.log_requests:
            sys.stderr.write(f"local-runtime: {format % args}\n")

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._drain()
        self._error(404, "UnknownOperationException", "Unknown operation")

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        match = _INVOCATIONS.match(urllib.parse.urlsplit(self.path).path)
        if not match:
            self._drain(length)
            return self._error(404, "UnknownOperationException", "Unknown operation")
        if not self.headers.get("Authorization", "").startswith("AWS4-HMAC-SHA256 "):
            self._drain(length)
            return self._error(403, "MissingAuthenticationTokenException", "Missing Authentication Token")
        endpoint = urllib.parse.unquote(match.group(1))
        if endpoint not in self.runtime.endpoints:
            self._drain(length)
            return self._error(400, "ValidationError", f"Endpoint {endpoint} of account {ACCOUNT} not found.")
        if length > MAX_BODY_BYTES:
            self._drain(length)
            return self._error(413, "ValidationError",
                               f"Request body of {length} bytes exceeds the limit of {MAX_BODY_BYTES} bytes.")
        target = self.headers.get(TARGET_MODEL_HEADER)
        body = self.rfile.read(length)
        if not self.runtime.multi_model:
            if target is not None:
                return self._error(400, "ValidationError", f"Endpoint {endpoint} is not a multi-model endpoint: "
                                                           f"it does not take a TargetModel.")
            return self._forward(endpoint, "/invocations", body)
        name = _TARGET_MODEL.match(target or "")
        if name is None:
            return self._error(400, "ValidationError", f"Endpoint {endpoint} is a multi-model endpoint: name a "
                                                       f"TargetModel of the form NAME.tar.gz, got {target!r}.")
        try:
            failure = self._ensure_loaded(name.group(1))
        except (socket.timeout, TimeoutError):
            return self._model_error(endpoint, 0, _TIMED_OUT)
        except OSError as exc:
            return self._error(503, "ServiceUnavailable", f"The model container could not be reached: {exc}")
        if failure is not None:
            return self._model_error(endpoint, *failure)
        self._forward(endpoint, f"/models/{name.group(1)}/invoke", body)

    def _container(self, method: str, path: str, body: bytes | None = None,
                   headers: dict[str, str] | None = None) -> tuple[int, http.client.HTTPResponse, bytes]:
        host, port = self.runtime.container
        connection = http.client.HTTPConnection(host, port, timeout=self.runtime.timeout_s)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            reply = connection.getresponse()
            return reply.status, reply, reply.read()
        finally:
            connection.close()

    def _ensure_loaded(self, name: str) -> tuple[int, str] | None:
        """Load ``name`` as SageMaker would before its first invocation; (status, message) when it cannot."""
        runtime = self.runtime
        with runtime.models_lock:
            if name in runtime.loaded:
                runtime.loaded.remove(name)
                runtime.loaded.append(name)
                return None
            load = json.dumps({"model_name": name, "url": f"{runtime.models_root}/{name}/model"}).encode()
            while True:
                status, _, answer = self._container("POST", "/models", load, {"Content-Type": "application/json"})
                if status == 507 and runtime.loaded:  # memory: unload the least recently used, try again
                    self._container("DELETE", f"/models/{runtime.loaded.pop(0)}")
                    continue
                if status in (200, 409):
                    runtime.loaded.append(name)
                    return None
                return status, answer.decode("utf-8", "replace")

    def _forward(self, endpoint: str, path: str, body: bytes) -> None:
        headers = {name: self.headers[name] for name in (*FORWARDED_HEADERS, TARGET_MODEL_HEADER)
                   if self.headers.get(name) is not None}
        try:
            _, reply, answer = self._container("POST", path, body, headers)
        except (socket.timeout, TimeoutError):
            return self._model_error(endpoint, 0, _TIMED_OUT)
        except OSError as exc:
            return self._error(503, "ServiceUnavailable", f"The model container could not be reached: {exc}")
        if 200 <= reply.status < 300:
            extra = {"X-Amzn-SageMaker-Custom-Attributes": reply.getheader("X-Amzn-SageMaker-Custom-Attributes")}
            return self._send(200, answer, reply.getheader("Content-Type") or "application/octet-stream",
                              {"x-Amzn-Invoked-Production-Variant": VARIANT,
                               **{k: v for k, v in extra.items() if v is not None}})
        self._model_error(endpoint, reply.status, answer.decode("utf-8", "replace"))

    def _model_error(self, endpoint: str, status: int, original: str) -> None:
        kind = "client" if 400 <= status < 500 else "server"
        log_group = f"/aws/sagemaker/Endpoints/{endpoint}"
        body = {
            "ErrorCode": "CLIENT_ERROR_FROM_MODEL" if kind == "client" else "INTERNAL_FAILURE_FROM_MODEL",
            "LogStreamArn": f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:{log_group}",
            "Message": (f'Received {kind} error ({status}) from {CONTAINER_NAME} with message "{original}". '
                        f"See the log group {log_group} in account {ACCOUNT} for more information."),
            "OriginalMessage": original,
            "OriginalStatusCode": status,
        }
        self._send(424, json.dumps(body).encode(), "application/json", {"x-amzn-ErrorType": _MODEL_ERROR})

    def _error(self, status: int, code: str, message: str) -> None:
        self._send(status, json.dumps({"message": message}).encode(), "application/json",
                   {"x-amzn-ErrorType": f"{code}:http://internal.amazon.com/coral/com.amazon.sagemaker/"})

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _drain(self, length: int | None = None) -> None:
        """Read an unwanted body so that the connection stays usable."""
        if length is None:
            length = int(self.headers.get("Content-Length") or 0)
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 16))
            if not chunk:
                break
            length -= len(chunk)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kennel-local-runtime", description=__doc__.split("\n\n")[0])
    parser.add_argument("--container-url", required=True, help="the serving container, e.g. http://127.0.0.1:8080")
    parser.add_argument("--endpoint", action="append", help="endpoint name(s) to answer for (default kennel-local)")
    parser.add_argument("--port", type=int, default=8081, help="port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--timeout", type=float, default=CONTAINER_TIMEOUT_S, help="seconds the container may take")
    parser.add_argument("--multi-model", action="store_true",
                        help="a multi-model endpoint: requests name a TargetModel NAME.tar.gz, loaded on first use")
    parser.add_argument("--models-root", default="/opt/ml/models",
                        help="with --multi-model: where the container sees NAME/model (default /opt/ml/models)")
    args = parser.parse_args(argv)
    try:
        runtime = LocalRuntime(args.container_url, args.endpoint or ["kennel-local"], port=args.port,
                               timeout_s=args.timeout, log_requests=True, multi_model=args.multi_model,
                               models_root=args.models_root)
    except (ValueError, OSError) as exc:
        print(f"local_runtime: {exc}", file=sys.stderr)
        return 2
    print(f"SageMaker runtime for {', '.join(sorted(runtime.endpoints))} on {runtime.url} "
          f"-> {args.container_url}{'/models/NAME/invoke' if args.multi_model else '/invocations'}", flush=True)
    try:
        runtime.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
