"""What a running `serve` tells about its requests agrees with what its clients saw.

Several clients at once against two workers, good and bad requests mixed: the
Prometheus endpoint's counts, the JSON/EMF lines in the log and the answers'
headers (X-Kennel-Request-Id, Server-Timing) must agree exactly; the stages of each
request add up to no more than its worker time; /ping leaves no line in the log.
"""
from __future__ import annotations

import json
import re
import threading
import time
import urllib.request

import pytest

from kennel_ops.ports import free_port
from serve_support import ServeProcess, jpeg_bytes, plugins, resnet18_base  # noqa: F401

from kennel_serve.metrics import STAGES

CLIENTS, PER_CLIENT = 4, 12


@pytest.fixture(scope="module")
def observed(resnet18_base, plugins):  # noqa: F811
    port = free_port()
    process = ServeProcess(resnet18_base, plugins, env={"SAGEMAKER_MODEL_SERVER_WORKERS": "2", "KENNEL_METRICS": "true",
                                                        "KENNEL_METRICS_PORT": str(port),
                                                        "KENNEL_METRICS_EMF": "true",
                                                        "KENNEL_METRICS_MODEL": "dogs"})
    process.start()
    try:
        process.wait_ready()
        yield process, f"http://127.0.0.1:{port}/metrics"
    finally:
        process.stop()


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def timing(header: str) -> dict[str, float]:
    return {name: float(value) for name, _, value in (e.strip().partition(";dur=") for e in header.split(","))}


def request_lines(log: str) -> list[dict]:
    return [json.loads(line) for line in log.splitlines() if line.startswith('{"request_id":')]


def test_metrics_logs_and_answers_agree_under_load(observed):
    server, metrics_url = observed
    photo = jpeg_bytes((500, 375), seed=1)
    for _ in range(20):
        assert server.ping() == 200
    before = len(request_lines(server.log()))
    answers, lock = [], threading.Lock()

    def client(number: int) -> None:
        for index in range(PER_CLIENT):
            bad = (number + index) % 4 == 0
            headers = {"X-Amzn-RequestId": f"client-{number}-{index}"} if index % 2 else {}
            reply = server.invoke(b"not an image" if bad else photo, "image/jpeg", headers=headers)
            with lock:
                answers.append((reply, headers.get("X-Amzn-RequestId")))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    statuses = [reply.status for reply, _ in answers]
    assert len(answers) == CLIENTS * PER_CLIENT and set(statuses) == {200, 400}
    ids = [reply.headers["x-kennel-request-id"] for reply, _ in answers]
    assert len(set(ids)) == len(ids)
    for reply, sent_id in answers:
        # SageMaker's id when it sent one, else MMS's own (its X-Request-Id).
        assert reply.headers["x-kennel-request-id"] == (sent_id or reply.headers["x-request-id"])
        stages = timing(reply.headers["server-timing"])
        assert list(stages) == ["worker", *STAGES]
        # Each entry is rounded to 0.1 ms.
        assert sum(stages[s] for s in STAGES) <= stages["worker"] + 0.05 * (len(STAGES) + 1)

    # The log: one line per answer, the same ids and statuses, EMF with bounded dimensions.
    deadline = time.monotonic() + 10
    while len(request_lines(server.log())) - before < len(answers) and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = request_lines(server.log())[before:]
    assert sorted((line["request_id"], line["status"]) for line in lines) == sorted(
        (reply.headers["x-kennel-request-id"], reply.status) for reply, _ in answers)
    for line in lines:
        assert line["Model"] == "dogs" and "_aws" in line
        assert {n for d in line["_aws"]["CloudWatchMetrics"] for g in d["Dimensions"] for n in g} <= {
            "Model", "StatusClass"}
        reply = next(r for r, _ in answers if r.headers["x-kennel-request-id"] == line["request_id"])
        assert line["WorkerTime"] == pytest.approx(timing(reply.headers["server-timing"])["worker"], abs=0.051)
    assert not re.search(r"/ping", server.log()), "a /ping call was logged"

    # Prometheus: exact counts; the stage sums within the worker time.
    samples = scrape(metrics_url)
    ok, bad = statuses.count(200), statuses.count(400)
    assert samples['kennel_requests_total{model="dogs",status_class="2xx"}'] == ok
    assert samples['kennel_requests_total{model="dogs",status_class="4xx"}'] == bad
    assert samples['kennel_request_seconds_count{model="dogs"}'] == len(answers)
    worker_sum = samples['kennel_request_seconds_sum{model="dogs"}']
    stage_sum = sum(samples[f'kennel_stage_seconds_sum{{model="dogs",stage="{s}"}}'] for s in STAGES)
    assert 0 < stage_sum <= worker_sum
    assert worker_sum == pytest.approx(sum(line["WorkerTime"] for line in lines) / 1000, rel=1e-3, abs=1e-3)
    assert samples['kennel_workers{model="dogs"}'] == 2 and samples['kennel_busy_workers{model="dogs"}'] == 0
    assert samples['kennel_resident_memory_bytes{model="dogs"}'] > 100 * 2**20
