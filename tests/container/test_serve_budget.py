"""The request budget on the real image, under a memory limit: hostile requests and slow image servers.

The serving container runs hardened (as compose runs it) with a memory limit
that leaves each of its two workers room for the 256 MiB budget and no more.
It gets kennel_ops.load.bombs' corpus from two clients at once (both workers busy
with bombs together), and image URLs pointing at slow-drip servers on its own
127.0.0.1 (started inside the container, allowed by KENNEL_URL_ALLOWLIST): a
status line, headers, chunk-size lines or a body sent a byte at a time, a TLS
handshake that never comes, and one request naming eight such URLs.

Asserted: every answer is the expected one (never a 5xx), a URL request ends
within the one request deadline, the kernel killed nothing (the container's
OOM flag), no worker was restarted (same PIDs), each worker's peak resident
memory stayed within the budget above its idle size, and /ping is 200 afterwards.
"""
from __future__ import annotations

import concurrent.futures
import http.client
import json
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from docker_cli import model_workers, random_model, run
from kennel_ops.load import bombs
from kennel_ops.load.payloads import dog_photos

pytestmark = pytest.mark.container

BUDGET_MIB = 256
URL_TIMEOUT_S = 2.0
# Idle: the JVM and two workers of a ResNet-18 (about 700 MiB); each worker may add its budget.
MEMORY_LIMIT = "1400m"

DRIP_SERVER = textwrap.dedent('''
    """Slow image servers on 127.0.0.1: each answer a byte at a time, 30 s at most."""
    import socket, threading, time

    def drip(conn, data, pause=0.3):
        try:
            for i in range(len(data)):
                conn.sendall(data[i:i + 1])
                time.sleep(pause)
        except OSError:
            pass
        finally:
            conn.close()

    ANSWERS = {
        b"/status": b"HTTP/1.1 200 OK\\r\\nContent-Length: 10\\r\\n\\r\\n0123456789",
        b"/headers": b"HTTP/1.1 200 OK\\r\\n" + b"X-Pad: " + b"a" * 100 + b"\\r\\nContent-Length: 1\\r\\n\\r\\nx",
        b"/chunks": None,
        b"/body": None,
    }

    def handle(conn):
        request = b""
        while b"\\r\\n\\r\\n" not in request:
            part = conn.recv(4096)
            if not part:
                return conn.close()
            request += part
        path = request.split(b" ")[1]
        if path == b"/chunks":
            conn.sendall(b"HTTP/1.1 200 OK\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n")
            drip(conn, b"1" * 100)
        elif path == b"/body":
            conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 100000\\r\\n\\r\\n\\xff\\xd8")
            drip(conn, b"\\0" * 100)
        else:
            drip(conn, ANSWERS.get(path, ANSWERS[b"/status"]), 0.3 if path != b"/status" else 0.7)

    def serve(port, handler):
        listener = socket.create_server(("127.0.0.1", port))
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=handler, args=(conn,), daemon=True).start()

    def silent(conn):  # accepts, then never says a word: a TLS handshake that does not come
        time.sleep(30)
        conn.close()

    threading.Thread(target=serve, args=(8443, silent), daemon=True).start()
    serve(8001, handle)
''')

SLOW_URLS = {
    "status line a byte every 0.7 s": "http://127.0.0.1:8001/status",
    "headers a byte every 0.3 s": "http://127.0.0.1:8001/headers",
    "chunk-size line a byte every 0.3 s": "http://127.0.0.1:8001/chunks",
    "body a byte every 0.3 s": "http://127.0.0.1:8001/body",
    "TLS handshake never answered": "https://127.0.0.1:8443/photo.jpg",
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return random_model(tmp_path_factory.mktemp("budget-model"), seed=5)


class Container:
    def __init__(self, image: str, model_dir: Path):
        self.name = f"kennel-budget-{uuid.uuid4().hex[:8]}"
        run(["docker", "run", "--detach", "--name", self.name, "--publish", "127.0.0.1::8080",
             "--memory", MEMORY_LIMIT, "--memory-swap", MEMORY_LIMIT,
             "--read-only", "--tmpfs", "/tmp:exec,mode=1777", "--cap-drop", "ALL",
             "--security-opt", "no-new-privileges:true",
             "--volume", f"{model_dir}:/opt/ml/model:ro",
             "--env", "SAGEMAKER_MODEL_SERVER_WORKERS=2", "--env", "KENNEL_ORT_THREADS=1",
             "--env", "KENNEL_URL_ALLOWLIST=127.0.0.1", "--env", f"KENNEL_URL_TIMEOUT_S={URL_TIMEOUT_S:g}",
             image, "serve"], timeout=120)
        self.port = int(run(["docker", "port", self.name, "8080/tcp"], timeout=30).stdout.split(":")[-1])

    def request(self, method: str, path: str, body: bytes = b"", headers: dict | None = None,
                timeout: float = 60) -> tuple[int, bytes, float]:
        began = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read(), time.monotonic() - began
        finally:
            conn.close()

    def wait_healthy(self, timeout_s: float = 240) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if self.request("GET", "/ping", timeout=5)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(1)
        pytest.fail(f"not healthy within {timeout_s} s:\n{self.logs()}", pytrace=False)

    def python(self, code: str, detach: bool = False) -> str:
        args = ["docker", "exec", *(["--detach"] if detach else []), self.name, "python", "-c", code]
        return run(args, timeout=60).stdout

    def worker_memory(self) -> dict[int, tuple[int, int]]:
        return model_workers(self.name)

    def reset_peaks(self, pids) -> None:
        self.python(f"for pid in {sorted(pids)}: open(f'/proc/{{pid}}/clear_refs', 'w').write('5')")

    def inspect(self) -> dict:
        return json.loads(run(["docker", "inspect", self.name], timeout=60).stdout)[0]

    def logs(self) -> str:
        result = run(["docker", "logs", "--tail", "80", self.name], timeout=60, check=False)
        return result.stdout + result.stderr

    def remove(self) -> None:
        run(["docker", "rm", "--force", self.name], timeout=120, check=False)


@pytest.fixture(scope="module")
def server(serve_image, model_dir):
    container = Container(serve_image, model_dir)
    try:
        container.wait_healthy()
        container.python(DRIP_SERVER, detach=True)
        yield container
    finally:
        container.remove()


def invoke(server: Container, case: bombs.BudgetCase) -> tuple[bombs.BudgetCase, int, bytes, float]:
    headers = {"Content-Type": case.content_type, "Accept": "application/json", **case.headers}
    status, body, seconds = server.request("POST", "/invocations", case.body, headers)
    return case, status, body, seconds


def url_cases() -> list[bombs.BudgetCase]:
    cases = [bombs.BudgetCase(f"URL: {name}", json.dumps({"url": url}).encode(), "application/json", 400)
             for name, url in SLOW_URLS.items()]
    eight = (list(SLOW_URLS.values()) * 2)[:8]
    cases.append(bombs.BudgetCase("8 slow URLs in one JSON lines body (one deadline for all)",
                                  "\n".join(json.dumps({"url": url}) for url in eight).encode(),
                                  "application/jsonlines", 400))
    return cases


def test_hostile_requests_and_slow_servers_under_a_memory_limit(server):
    photo = dog_photos(1, seed=4)[0]
    plain = bombs.BudgetCase("plain photo", photo, "image/jpeg", 200)
    for _ in range(4):  # both workers have served a request: their idle size includes that
        assert invoke(server, plain)[1] == 200
    before = server.worker_memory()
    assert len(before) == 2, before
    server.reset_peaks(before)
    idle_kib = {pid: server.worker_memory()[pid][0] for pid in before}

    corpus = bombs.cases()
    slow = url_cases()
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        # Each bomb twice, from two clients at once: both workers hold one together.
        answers = list(pool.map(lambda case: invoke(server, case), [c for c in corpus for _ in range(2)] + slow))

    problems = []
    for case, status, body, seconds in answers:
        if status != case.expect:
            problems.append(f"{case.name}: HTTP {status}, expected {case.expect}: {body[:200]!r}")
        elif status != 200:
            reason = json.loads(body).get("error", "")
            if len(reason) < 10 or "Traceback" in reason:
                problems.append(f"{case.name}: no readable reason: {body[:200]!r}")
    for case, status, body, seconds in answers:
        if case in slow and seconds > URL_TIMEOUT_S + 3:
            problems.append(f"{case.name}: answered after {seconds:.1f} s, the request deadline is {URL_TIMEOUT_S} s")
    assert not problems, "\n".join(problems) + "\n" + server.logs()

    after = server.worker_memory()
    assert set(after) == set(before), f"workers were restarted: {sorted(before)} -> {sorted(after)}\n{server.logs()}"
    for pid, (_, peak_kib) in after.items():
        added_mib = (peak_kib - idle_kib[pid]) / 1024
        assert added_mib <= BUDGET_MIB, f"worker {pid} peaked {added_mib:.0f} MiB above its idle size"
    state = server.inspect()["State"]
    assert state["Running"] and not state["OOMKilled"], state
    assert server.request("GET", "/ping")[0] == 200
    assert invoke(server, plain)[1] == 200
