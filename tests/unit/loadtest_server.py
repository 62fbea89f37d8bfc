"""A real HTTP server with a known capacity, for testing the load generator and its analysis.

`slots` requests are served at once, each taking `service_s`: the capacity is
slots / service_s requests per second, and queueing beyond it is real. Each
answer says how long its slot was held (Server-Timing: worker), as kennel-serve does.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class CapacityServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, slots: int = 2, service_s: float = 0.02, fail_every: int = 0, hang_s: float = 0.0):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.slots = threading.Semaphore(slots)
        self.service_s = service_s
        self.fail_every = fail_every  # every n-th request answers 503
        self.hang_s = hang_s  # every request sleeps this long before answering (timeouts)
        self.count = 0
        self.lock = threading.Lock()
        self.bodies: list[int] = []
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def handle_error(self, request, client_address) -> None:
        pass  # a client that timed out and hung up: expected in these tests

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/invocations"

    def __enter__(self) -> "CapacityServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real server

    def log_message(self, *args) -> None:
        pass

    def _answer(self, status: int, payload, timing: str | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if timing:
            self.send_header("Server-Timing", timing)
        if status == 200:
            self.send_header("X-Kennel-Precision", "int8; setting=auto; speedup=2.50")  # as kennel-serve says it
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer(200 if self.path == "/ping" else 404, {})

    def do_POST(self) -> None:
        server: CapacityServer = self.server  # type: ignore[assignment]
        length = int(self.headers.get("Content-Length", 0))
        self.rfile.read(length)
        with server.lock:
            server.count += 1
            n = server.count
            server.bodies.append(length)
        if server.hang_s:
            time.sleep(server.hang_s)
        if server.fail_every and n % server.fail_every == 0:
            self._answer(503, {"error": "overloaded"})
            return
        with server.slots:
            began = time.perf_counter()
            time.sleep(server.service_s)
            served_ms = (time.perf_counter() - began) * 1000
        self._answer(200, [[0.1, 0.9]], timing=f"worker;dur={served_ms:.2f}")
