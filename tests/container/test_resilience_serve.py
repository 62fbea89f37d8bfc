"""Resilience of the serving container on a real engine: sustained load, hostile
input, a killed model worker, SIGTERM under load and a restart.

The model is a torchvision ResNet-18 with random weights and the original head
(133 classes), exported to ONNX here: a real CNN, so the server, not the load
generator, is the bottleneck. Bounded for CI (a few minutes on a 2-core host);
KENNEL_RESILIENCE_LONG=1 runs the long variants (10 minutes of sustained load,
20,000 hostile requests, repeated worker kills).

Everything goes to 127.0.0.1 (published ports) or to the test's own Docker
network (a redirect server that `serve` is allowed to fetch from).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import json
import os
import random
import socket
import subprocess
import textwrap
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from docker_cli import model_workers, random_model, run
from kennel_ops.load import hostile
from kennel_ops.load.client import Connection, Target, run_closed_loop, run_open_loop, wait_until_healthy, warm_up
from kennel_ops.load.docker_stats import ContainerSampler
from kennel_ops.load.payloads import dog_photos
from kennel_ops.load.report import step_table
from kennel_ops.load.stats import max_sustainable, percentile, ramp, summarize, trend

pytestmark = pytest.mark.container

LONG = os.environ.get("KENNEL_RESILIENCE_LONG", "").strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class Budget:
    ramp_step_s: float  # each closed-loop step of the quick max-rate ramp
    confirm_s: float  # the best ramp step's concurrency again, for longer: the max rate is the lower of the two
    sustained_s: float  # open-loop load at 80% of the max rate
    hostile_cases: int
    worker_kills: int
    fault_load_s: float  # load around each worker kill


BUDGET = (Budget(ramp_step_s=8, confirm_s=30, sustained_s=600, hostile_cases=20_000, worker_kills=3,
                 fault_load_s=40) if LONG
          else Budget(ramp_step_s=5, confirm_s=15, sustained_s=45, hostile_cases=2_000, worker_kills=1,
                      fault_load_s=25))
STARTUP_TIMEOUT_S = 240
TARGET_P99_S = 1.0  # the load test's default latency target, which defines the max rate
RECOVERY_BOUND_S = 60  # a killed worker must be replaced and serving within this
HANG_BOUND_S = 15  # no hostile request may take longer (URL fetches are capped at 3 s here)
# Memory is flat when the fitted line rises less than this over the window.
MEMORY_ABS_TOLERANCE_MIB = 24
MEMORY_REL_TOLERANCE = 0.02


# ---------------------------------------------------------------- model and containers

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return random_model(tmp_path_factory.mktemp("resilience-model"), seed=7)


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    return dog_photos(4, seed=11)


class ServeContainer:
    """kennel-serve on a free 127.0.0.1 port; `hardened` mirrors compose.yaml's serve service
    (read-only root, tmpfs /tmp, no capabilities), plain is `docker run IMAGE serve` as SageMaker does."""

    def __init__(self, image: str, model_dir: Path, env: dict[str, str] | None = None, network: str | None = None,
                 hardened: bool = True, cpus: set[int] | None = None):
        self.name = f"kennel-resilience-{uuid.uuid4().hex[:8]}"
        args = ["docker", "run", "--detach", "--name", self.name, "--publish", "127.0.0.1::8080",
                "--volume", f"{model_dir}:/opt/ml/model:ro"]
        if cpus:
            args += ["--cpuset-cpus", ",".join(str(cpu) for cpu in sorted(cpus))]
        if hardened:
            args += ["--read-only", "--tmpfs", "/tmp:exec,mode=1777", "--cap-drop", "ALL",
                     "--security-opt", "no-new-privileges:true"]
        if network:
            args += ["--network", network]
        for key, value in (env or {}).items():
            args += ["--env", f"{key}={value}"]
        self.id = run([*args, image, "serve"], timeout=120).stdout.strip()
        self.url = ""

    def wait_healthy(self, timeout_s: float = STARTUP_TIMEOUT_S) -> float:
        """Seconds until GET /ping answered 200 (the published port can change on restart)."""
        port = run(["docker", "port", self.name, "8080/tcp"], timeout=30).stdout.splitlines()[0].rsplit(":", 1)[1]
        self.url = f"http://127.0.0.1:{port}/invocations"
        try:
            return wait_until_healthy(Target(self.url).with_path("/ping"), timeout_s)
        except TimeoutError as exc:
            pytest.fail(f"{exc}\n{self.logs()}", pytrace=False)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].split("/")[0])

    def logs(self, tail: int = 60) -> str:
        result = run(["docker", "logs", "--tail", str(tail), self.name], timeout=60, check=False)
        return result.stdout + result.stderr

    def worker_pids(self) -> set[int]:
        """PIDs (in the container) of MMS's Python model workers."""
        return set(model_workers(self.name))

    def kill_worker(self, pid: int) -> None:
        run(["docker", "exec", self.name, "python", "-c", f"import os, signal; os.kill({pid}, signal.SIGKILL)"],
            timeout=60)

    def inspect(self) -> dict:
        return json.loads(run(["docker", "inspect", self.name], timeout=60).stdout)[0]

    def remove(self) -> None:
        run(["docker", "rm", "--force", self.name], timeout=120, check=False)


REDIRECTOR = textwrap.dedent('''
    """Test-network image server: a photo, redirects, loops, slow and huge bodies."""
    import http.server, time, urllib.parse
    PHOTO = open("/srv/photo.jpg", "rb").read()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def log_message(self, *args):
            pass
        def answer(self, status, body=b"", headers=()):
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def do_GET(self):
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query)
            if url.path == "/photo.jpg":
                self.answer(200, PHOTO, [("Content-Type", "image/jpeg")])
            elif url.path == "/redirect":
                self.answer(302, headers=[("Location", query["to"][0])])
            elif url.path == "/loop":
                self.answer(302, headers=[("Location", "/loop")])
            elif url.path == "/chain":
                left = int(query["n"][0])
                self.answer(302, headers=[("Location", "/photo.jpg" if left <= 0 else f"/chain?n={left - 1}")])
            elif url.path == "/slow":  # one byte every half second, 30 s at most
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(PHOTO)))
                self.end_headers()
                for i in range(60):
                    self.wfile.write(PHOTO[i:i + 1])
                    self.wfile.flush()
                    time.sleep(0.5)
            elif url.path in ("/huge", "/huge-chunked"):  # 50 MB at most
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                chunked = url.path == "/huge-chunked"
                self.send_header(*(("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(50 << 20))))
                self.end_headers()
                block = PHOTO[:2] + bytes((1 << 16) - 2)
                for _ in range(800):
                    self.wfile.write((b"%x\\r\\n" % len(block) + block + b"\\r\\n") if chunked else block)
            elif url.path == "/html":
                self.answer(200, b"<html><body>not a dog</body></html>", [("Content-Type", "text/html")])
            elif url.path.startswith("/status/"):
                self.answer(int(url.path.rsplit("/", 1)[1]), b"{}", [("Content-Type", "application/json")])
            else:
                self.answer(404, b"not found")

    http.server.ThreadingHTTPServer(("0.0.0.0", 8000), Handler).serve_forever()
''')


@pytest.fixture(scope="module")
def network():
    name = f"kennel-resilience-{uuid.uuid4().hex[:8]}"
    run(["docker", "network", "create", name], timeout=60)
    yield name
    run(["docker", "network", "rm", name], timeout=60, check=False)


@pytest.fixture(scope="module")
def redirector(serve_image, network, photos, tmp_path_factory):
    """The redirect server, reachable from `serve` as http://redirector:8000 on the test network only."""
    folder = tmp_path_factory.mktemp("redirector")
    (folder / "redirector.py").write_text(REDIRECTOR)
    (folder / "photo.jpg").write_bytes(photos[0])
    for path in (folder, *folder.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    name = f"kennel-redirector-{uuid.uuid4().hex[:8]}"
    run(["docker", "run", "--detach", "--name", name, "--network", network, "--network-alias", "redirector",
         "--volume", f"{folder}:/srv:ro", "--entrypoint", "python", serve_image, "/srv/redirector.py"], timeout=120)
    try:
        probe = ("import urllib.request, time\nfor _ in range(100):\n try:\n"
                 "  urllib.request.urlopen('http://127.0.0.1:8000/photo.jpg', timeout=1); break\n"
                 " except OSError:\n  time.sleep(0.2)\nelse:\n raise SystemExit('redirector did not start')")
        run(["docker", "exec", name, "python", "-c", probe], timeout=60)
        yield "http://redirector:8000"
    finally:
        run(["docker", "rm", "--force", name], timeout=60, check=False)


@pytest.fixture(scope="module")
def server(serve_image, model_dir, network, redirector):
    """The hardened serving container, allowed to fetch image URLs from the redirect server only."""
    container = ServeContainer(serve_image, model_dir, network=network, env={
        "KENNEL_URL_ALLOWLIST": "redirector", "KENNEL_URL_TIMEOUT_S": "3", "KENNEL_URL_MAX_BYTES": str(1 << 20)})
    try:
        container.wait_healthy()
        yield container
    finally:
        container.remove()


def post_json(url: str, body: bytes, content_type: str = "image/jpeg") -> tuple[int, object]:
    """(status, parsed JSON answer), or (status, the raw body) when it is not JSON."""
    conn = Connection(Target(url, content_type=content_type))
    try:
        status, data = conn.post(body)
    except (OSError, http.client.HTTPException) as exc:
        return 0, f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
    try:
        return status, json.loads(data)
    except ValueError:
        return status, data[:200]


@pytest.fixture(scope="module")
def reference(server, photos) -> list[list[float]]:
    """The answer for each photo on an idle server: later answers must equal it."""
    answers = []
    for photo in photos:
        status, scores = post_json(server.url, photo)
        assert status == 200 and len(scores) == 1 and len(scores[0]) == 133
        answers.append(scores)
    return answers


def same_scores(answer, expected) -> bool:
    return np.allclose(np.asarray(answer, dtype=np.float64), np.asarray(expected, dtype=np.float64),
                       rtol=1e-4, atol=1e-4)


class PingMonitor:
    """GET /ping every 0.25 s (2 s timeout) in the background; every answer recorded."""

    def __init__(self, url: str):
        self.ping = Target(url, timeout_s=2.0).with_path("/ping")
        self.results: list[tuple[float, int, str | None]] = []  # (seconds, status, transport error)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        conn = Connection(Target(self.ping.url, timeout_s=2.0))
        while not self._stop.wait(0.25):
            began = time.perf_counter()
            try:
                status, _ = conn.request("GET")
                self.results.append((time.perf_counter() - began, status, None))
            except (OSError, http.client.HTTPException) as exc:
                self.results.append((time.perf_counter() - began, 0, type(exc).__name__))
        conn.close()

    def __enter__(self) -> "PingMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def failures(self) -> list[tuple[float, int, str | None]]:
        return [r for r in self.results if r[1] != 200 or r[0] > 2.0]


# ---------------------------------------------------------------- sustained load

@contextlib.contextmanager
def separate_cpus(image: str, model_dir: Path) -> Iterator[ServeContainer]:
    """A serving container on all CPUs but the first, this test's threads on the first.

    On a 2-CPU host the load generator (this process) and the server would otherwise
    take turns on the same CPUs, and the generator's own scheduling delays would
    count as the server's latency. With one CPU only, both share it.
    """
    mine = os.sched_getaffinity(0)
    cpus = sorted(mine)
    server = ServeContainer(image, model_dir, cpus=set(cpus[1:]) if len(cpus) > 1 else None)
    try:
        server.wait_healthy()
        if len(cpus) > 1:
            os.sched_setaffinity(0, {cpus[0]})  # this thread, and the threads it starts from now on
        yield server
    finally:
        os.sched_setaffinity(0, mine)
        server.remove()


def test_sustained_load_at_80_percent_of_max_rate(serve_image, model_dir, photos):
    """At 80% of the rate the ramp measured: every request answered, none an error, memory flat.
    How fast it answers is measured by the load test and the serving benchmark, not asserted here."""
    with separate_cpus(serve_image, model_dir) as server:
        sustained_load(server, photos)


def sustained_load(server: ServeContainer, photos: list[bytes]) -> None:
    target = Target(server.url)
    warm_up(target, photos, requests=8)
    measured = ramp(lambda c: summarize(run_closed_loop(target, photos, c, BUDGET.ramp_step_s, 5000)),
                    [1, 2, 3, 4, 6, 8], target_p99_s=TARGET_P99_S)
    best = max_sustainable(measured.steps, TARGET_P99_S)
    assert best is not None, f"no ramp step passed: {measured.stopped_because}"
    print("\n" + step_table(measured.steps) + f"\nramp stopped: {measured.stopped_because}")
    # A short step's rate is a noisy sample, and the best of several is biased upwards:
    # on a 2-vCPU VM one step ran 19.3/s where the server sustains 16 to 18. 80% of that
    # is a 90% load, whose queue a single stall of the host fills for seconds.
    workers = len(server.worker_pids())
    confirm_run = run_closed_loop(target, photos, max(best.concurrency, workers), BUDGET.confirm_s, 10_000)
    confirm = summarize(confirm_run)
    max_rate = min(best.throughput, confirm.throughput)
    print(f"confirmed at {best.concurrency} clients for {BUDGET.confirm_s:.0f} s: {confirm.throughput:.1f}/s")
    rate = 0.8 * max_rate

    began = time.monotonic()
    with ContainerSampler(server.id) as sampler:
        load = run_open_loop(target, photos, rate, BUDGET.sustained_s, clients=16)
    step = summarize(load)
    # Memory after the first fifth of the window (allocator and JVM settle); one sample a second.
    settled = [s for s in sampler.samples if s.at >= began + BUDGET.sustained_s / 5]
    assert len(settled) >= BUDGET.sustained_s / 2, f"too few memory samples ({len(settled)}): {sampler.error}"
    memory = trend([s.at - began for s in settled], [s.memory_bytes / 2**20 for s in settled],
                   abs_tolerance=MEMORY_ABS_TOLERANCE_MIB, rel_tolerance=MEMORY_REL_TOLERANCE)
    print(f"\nmax {max_rate:.1f}/s at {best.concurrency} clients; sustained {rate:.1f}/s for "
          f"{BUDGET.sustained_s:.0f} s: {step.requests} requests, p50 {step.p50 * 1000:.0f} ms, "
          f"p99 {step.p99 * 1000:.0f} ms; memory median {memory.median:.0f} MiB, "
          f"trend {memory.growth:+.1f} MiB over {memory.span_s:.0f} s (tolerance {memory.tolerance:.0f})")

    assert step.requests >= int(rate * BUDGET.sustained_s) - 1, "requests were lost"
    assert step.errors == {}, f"errors at {rate:.1f}/s: {step.errors}"
    assert memory.flat, (f"memory grows {memory.slope_per_s * 60:.1f} MiB/min "
                         f"({memory.growth:.1f} MiB over {memory.span_s:.0f} s, tolerance {memory.tolerance:.1f})")


# ---------------------------------------------------------------- hostile input

def _redirect_cases(base: str) -> list[tuple[hostile.Case, str]]:
    """(case, expectation) through the redirect server: 'refused' or 'photo' (a good answer)."""
    def url_case(path: str, description: str) -> hostile.Case:
        return hostile.Case("redirect server", description, json.dumps({"url": f"{base}{path}"}).encode(),
                            {"Content-Type": "application/json"})
    return [(url_case("/loop", "redirect loop"), "refused"),
            (url_case("/chain?n=6", "more redirects than allowed"), "refused"),
            (url_case("/slow", "body slower than the fetch deadline"), "refused"),
            (url_case("/huge", "Content-Length over the byte cap"), "refused"),
            (url_case("/huge-chunked", "chunked body over the byte cap"), "refused"),
            (url_case("/html", "an HTML page"), "refused"),
            (url_case("/status/404", "upstream 404"), "refused"),
            (url_case("/status/500", "upstream 500"), "refused"),
            (url_case("/redirect?to=" + "%2Fphoto.jpg", "allowed redirect to the photo"), "photo"),
            (url_case("/chain?n=2", "two allowed redirects"), "photo"),
            (url_case("/photo.jpg", "the photo itself"), "photo")]


def _raw_cases(host: str, port: int, photo: bytes) -> list[tuple[str, callable, str]]:
    """(name, send, expectation) for protocol-level cases; 'refused', 'too large' or 'photo'."""
    garbage = bytes(random.Random(5).randbytes(4000))
    big = photo[:2] + bytes(1 << 20)
    chunk = b"%x\r\n" % len(big) + big + b"\r\n"
    chunked_head = (b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n")

    def trickle(body: bytes, pieces: int = 12, pause: float = 0.25):
        size = len(body) // pieces + 1
        return [hostile.request_bytes(body)] + [body[i:i + size] for i in range(0, len(body), size)], pause

    cases = [
        ("slow body, garbage", *trickle(garbage), "refused"),
        ("slow body, a photo", *trickle(photo), "photo"),
        ("Content-Length 100 MB, 8 MB sent", [hostile.request_bytes(b"", length=100 << 20)] + [big] * 8, 0, "too large"),
        ("chunked body of 20 MB", [chunked_head] + [chunk] * 20 + [b"0\r\n\r\n"], 0, "too large"),
        ("request line garbage", [b"GARBAGE\r\n\r\n"], 0, "refused"),
        ("unknown HTTP version", [b"POST /invocations HTTP/9.9\r\nContent-Length: 0\r\n\r\n"], 0, "refused"),
        ("64 KB header", [hostile.request_bytes(b"abc", extra_headers="X-Big: " + "a" * 65536 + "\r\n"), b"abc"], 0,
         "refused"),
        ("64 KB path", [b"GET /" + b"a" * 65536 + b" HTTP/1.1\r\nHost: x\r\n\r\n"], 0, "refused"),
        ("Content-Length not a number",
         [b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: abc\r\n\r\n"], 0,
         "refused"),
        ("negative Content-Length",
         [b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: -5\r\n\r\n"], 0,
         "refused"),
    ]
    return [(name, (lambda c=c, p=p, n=name: hostile.send_raw(host, port, c, pause_s=p, timeout_s=30,
                                                            category="protocol", description=n)), expect)
            for name, c, p, expect in cases]


def _stall(host: str, port: int, count: int) -> list[socket.socket]:
    """Connections that send a head and half a body, then nothing: held open while the rest runs."""
    sockets = []
    for _ in range(count):
        sock = socket.create_connection((host, port), timeout=10)
        sock.sendall(hostile.request_bytes(b"", length=50_000) + bytes(25_000))
        sockets.append(sock)
    return sockets


def _documented_limit(answer: hostile.Answer) -> bool:
    """docs/serving.md, Known limits: a body sent as application/x-www-form-urlencoded that is
    not valid form data is refused by MMS itself, before any handler, with a 500 JSON message.
    Exactly that and nothing wider: another status, a body without a JSON message, any other
    Content-Type is judged by the normal rule."""
    if not answer.case.headers.get("Content-Type", "").startswith("application/x-www-form-urlencoded"):
        return False
    try:
        message = json.loads(answer.body).get("message", "")
    except (ValueError, AttributeError):
        return False
    return answer.status == 500 and isinstance(message, str) and len(message) >= 3 and "Traceback" not in message


def test_hostile_input_is_refused_with_json_reasons_and_never_hurts_the_server(server, photos, reference,
                                                                                 redirector):
    host, port = "127.0.0.1", server.port
    cases = list(hostile.generate(BUDGET.hostile_cases, photos[0], seed=2024, redirect_base=redirector))
    # Every 10th request is a good photo, whose answer must equal the reference answer.
    work: list[tuple[str, object, object]] = []
    for i, case in enumerate(cases):
        if i % 10 == 0:
            work.append(("good", i // 10 % len(photos), None))
        work.append(("case", case, "refused"))
    work += [("case", case, expect) for case, expect in _redirect_cases(redirector)]
    work += [("raw", send, expect) for _, send, expect in _raw_cases(host, port, photos[0])]
    random.Random(1).shuffle(work)

    def execute(item):
        kind, what, expect = item
        if kind == "good":
            status, scores = post_json(server.url, photos[what])
            return kind, what, expect, status, scores
        answer = what() if kind == "raw" else hostile.send(host, port, what, timeout_s=30)
        return kind, answer, expect, None, None

    stalled = _stall(host, port, 16)
    began = time.monotonic()
    with PingMonitor(server.url) as monitor, concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(execute, work))
    took = time.monotonic() - began
    for sock in stalled:
        sock.close()

    problems, slow, wrong, latencies, limits = [], [], [], [], 0
    for kind, answer, expect, status, scores in results:
        if kind == "good":
            if status != 200 or not isinstance(scores, list) or not same_scores(scores, reference[answer]):
                wrong.append((answer, status))
            continue
        latencies.append(answer.seconds)
        label = f"{answer.case.category}: {answer.case.description[:70]!r}"
        if answer.seconds > HANG_BOUND_S:
            slow.append(f"{label} took {answer.seconds:.1f} s")
        if expect == "photo":
            if answer.status != 200 or not same_scores(json.loads(answer.body), reference[0]):
                problems.append(f"{label}: expected the photo's scores, got HTTP {answer.status} {answer.body[:100]!r}")
        elif expect == "too large":
            # Beyond twice the payload limit MMS's HTTP layer answers 413 before buffering the body.
            if answer.status != 413:
                problems.append(f"{label}: expected 413, got HTTP {answer.status} {answer.error or ''}")
        elif _documented_limit(answer):
            limits += 1
        else:
            problem = hostile.refusal_problem(answer.status, answer.body)
            if problem:
                problems.append(f"{label}: {problem} {answer.body[:100]!r}")
    print(f"\n{len(results)} requests in {took:.0f} s ({len(cases)} generated hostile, {len(work) - len(cases)} "
          f"others); hostile answer p50 {percentile(latencies, 50) * 1000:.0f} ms, "
          f"p99 {percentile(latencies, 99) * 1000:.0f} ms, max {max(latencies):.1f} s; {len(monitor.results)} pings; "
          f"{limits} answers under the documented form-data limit")

    assert not problems, f"{len(problems)} bad answers, e.g.:\n" + "\n".join(sorted(set(problems))[:25])
    assert not slow, "\n".join(slow[:10])
    assert not wrong, f"{len(wrong)} good requests answered wrongly: {wrong[:5]}"
    assert len(monitor.results) >= took / 0.5
    assert not monitor.failures(), f"/ping failed during the run: {monitor.failures()[:5]}"
    status, scores = post_json(server.url, photos[1])
    assert status == 200 and same_scores(scores, reference[1])


# ---------------------------------------------------------------- faults

def test_killed_worker_is_replaced_and_the_service_recovers(server, photos, reference):
    target = Target(server.url, timeout_s=60)
    for kill in range(BUDGET.worker_kills):
        workers = server.worker_pids()
        assert workers, "no model worker process found"
        victim = min(workers)
        holder = {}
        load = threading.Thread(target=lambda: holder.setdefault(
            "run", run_closed_loop(target, photos, 4, BUDGET.fault_load_s, 100_000)))
        load.start()
        time.sleep(5)
        killed_at = time.monotonic()
        server.kill_worker(victim)
        replaced_at = None
        while time.monotonic() - killed_at < RECOVERY_BOUND_S:
            now_workers = server.worker_pids()
            if len(now_workers) >= len(workers) and victim not in now_workers:
                replaced_at = time.monotonic()
                break
            time.sleep(0.5)
        load.join(timeout=BUDGET.fault_load_s + 120)
        outcome = holder["run"]
        kill_s = killed_at - outcome.began
        failures = [o for o in outcome.outcomes if not o.ok]
        # Service restored: the replacement worker loaded its model, everything after succeeds.
        restored_s = (replaced_at - outcome.began) if replaced_at else None
        after = [o for o in outcome.outcomes if restored_s is not None and o.start > restored_s + 2.0]
        print(f"\nkill {kill + 1}: worker {victim} killed at {kill_s:.1f} s; replaced after "
              f"{(replaced_at - killed_at) if replaced_at else float('nan'):.1f} s; {len(failures)} failed of "
              f"{len(outcome.outcomes)} ({sorted({o.error for o in failures})}); {len(after)} after recovery")

        assert replaced_at is not None, f"worker {victim} not replaced within {RECOVERY_BOUND_S} s:\n{server.logs()}"
        assert len(failures) <= 4, f"more failures than requests in flight: {len(failures)}"
        assert all(o.status >= 500 for o in failures), "a failure without an HTTP answer (a hang or a reset)"
        assert all(kill_s - 30 <= o.start <= restored_s + 2.0 for o in failures), "failures outside the fault"
        assert len(after) >= 10 and all(o.ok for o in after)
        details = server.inspect()
        assert details["State"]["Running"] and details["RestartCount"] == 0
    status, scores = post_json(server.url, photos[2])
    assert status == 200 and same_scores(scores, reference[2])


def test_sigterm_under_load_drains_in_flight_requests_and_a_restart_is_healthy(serve_image, model_dir, photos):
    """Plain `docker run IMAGE serve` (as SageMaker runs it: /tmp survives a restart)."""
    container = ServeContainer(serve_image, model_dir, hardened=False)
    try:
        container.wait_healthy()
        status, expected = post_json(container.url, photos[3])
        assert status == 200
        target = Target(container.url, timeout_s=60)
        holder = {}
        # Clients stop sending 2 s after the signal (as the router stops routing after /ping fails).
        load = threading.Thread(target=lambda: holder.setdefault(
            "run", run_closed_loop(target, photos, 4, duration_s=8.0, max_requests=100_000)))
        load.start()
        time.sleep(6)
        signalled_at = time.monotonic()
        run(["docker", "kill", "--signal", "TERM", container.name], timeout=30)
        wait = run(["docker", "wait", container.name], timeout=60)
        exited_after = time.monotonic() - signalled_at
        load.join(timeout=120)
        outcome = holder["run"]
        signal_s = signalled_at - outcome.began
        before = [o for o in outcome.outcomes if o.start < signal_s]
        in_flight = [o for o in before if o.start + o.latency > signal_s]
        after = [o for o in outcome.outcomes if o.start >= signal_s]
        print(f"\nSIGTERM: exit {wait.stdout.strip()} after {exited_after:.1f} s; {len(in_flight)} in flight at the "
              f"signal, all {'ok' if all(o.ok for o in in_flight) else 'NOT ok'}; {len(after)} sent after it: "
              f"{sum(o.ok for o in after)} ok, errors {sorted({o.error for o in after if not o.ok})}")

        assert exited_after <= 30, f"exit took {exited_after:.1f} s"
        assert wait.stdout.strip() == "0", f"exit code {wait.stdout.strip()}:\n{container.logs()}"
        assert in_flight, "no request was in flight at the signal: the test did not test draining"
        assert all(o.ok for o in before), f"requests sent before SIGTERM failed: {[o.error for o in before if not o.ok]}"
        assert not [o for o in after if o.status >= 500], "a request accepted after SIGTERM got a 5xx"

        run(["docker", "start", container.name], timeout=60)
        restart_s = container.wait_healthy(timeout_s=120)
        status, scores = post_json(container.url, photos[3])
        assert status == 200 and same_scores(scores, expected)
        print(f"restart: healthy after {restart_s:.1f} s")

        idle_began = time.monotonic()
        run(["docker", "stop", "--time", "30", container.name], timeout=60)
        assert time.monotonic() - idle_began < 10, "an idle server should stop at once"
        assert container.inspect()["State"]["ExitCode"] == 0
    finally:
        container.remove()


# ---------------------------------------------------------------- the load-test command

def test_loadtest_command_runs_the_compose_service_and_writes_its_report(serve_image, model_dir, tmp_path):
    """`make loadtest`'s script end to end: compose's `serve` started on a free port with the
    settings asked for, CPU and memory sampled, report and plot written, nothing left running."""
    import math
    import sys

    from docker_cli import REPO

    report_path, plot_path = tmp_path / "report.json", tmp_path / "plot.png"
    result = subprocess.run(
        [sys.executable, "-m", "kennel_ops.loadtest", "--model-dir", str(model_dir),
         "--workers", "2", "--threads", "1", "--concurrency", "1,2", "--step-seconds", "4",
         "--warmup-requests", "4", "--target-p99", "10", "--report", str(report_path), "--plot", str(plot_path)],
        cwd=REPO, env={**os.environ, "KENNEL_SERVE_IMAGE": serve_image}, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    best = report["best_configuration"]
    assert best["settings"] == {"SAGEMAKER_MODEL_SERVER_WORKERS": "2", "KENNEL_ORT_THREADS": "1"}
    assert best["layout"] == {"workers": 2, "threads": 1, "solo_threads": 1}  # what the server says it ran
    rate = report["max_sustainable_rps"]
    assert rate > 0 and report["recommended_invocations_per_instance"] == math.floor(rate * 60 * 0.5)
    for step in best["steps"]:
        assert step["success_rate"] == 1.0
        assert step["cpu_percent"] > 10 and step["memory_mib"] > 100  # sampled from the container
    assert plot_path.read_bytes()[:4] == b"\x89PNG"
    assert "recommended SageMakerVariantInvocationsPerInstance" in result.stdout
    left = run(["docker", "ps", "--all", "--quiet", "--filter", "name=kennel-loadtest-"], timeout=60).stdout
    assert left.strip() == "", "the load test left its container behind"
