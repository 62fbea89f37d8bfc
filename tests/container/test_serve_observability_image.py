"""The image's metrics under load: the Prometheus endpoint (its own port) and the EMF lines
in `docker logs` agree with what the clients saw; /ping leaves no line."""
from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest

import serve_support as support
from test_serve_image import Container, containers, model_dir  # noqa: F401 (fixtures)

from kennel_ops.ports import free_port
from kennel_serve.metrics import STAGES

pytestmark = pytest.mark.container
CLIENTS, PER_CLIENT = 3, 10


def test_prometheus_and_emf_lines_agree_with_the_clients(serve_image, model_dir, containers):  # noqa: F811
    metrics_port = free_port()
    server = Container(serve_image, model_dir, env={"SAGEMAKER_MODEL_SERVER_WORKERS": "2", "KENNEL_METRICS": "true"},
                       extra=["-p", f"127.0.0.1:{metrics_port}:9100"])
    containers.append(server)
    server.wait_ready()
    for _ in range(10):
        assert support.http(f"{server.url}/ping", timeout=5).status == 200
    photo = support.jpeg_bytes((500, 375), seed=3)
    answers, lock = [], threading.Lock()

    def client(number: int) -> None:
        for index in range(PER_CLIENT):
            reply = server.invoke(b"no image" if (number + index) % 3 == 0 else photo)
            with lock:
                answers.append(reply)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = [reply.status for reply in answers]
    assert set(statuses) == {200, 400}

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        samples = {name: float(value) for name, _, value in
                   (line.rpartition(" ") for line in reply.read().decode().splitlines() if not line.startswith("#"))}
    assert samples['kennel_requests_total{model="kennel",status_class="2xx"}'] == statuses.count(200)
    assert samples['kennel_requests_total{model="kennel",status_class="4xx"}'] == statuses.count(400)
    stage_sum = sum(samples[f'kennel_stage_seconds_sum{{model="kennel",stage="{s}"}}'] for s in STAGES)
    assert 0 < stage_sum <= samples['kennel_request_seconds_sum{model="kennel"}']

    deadline = time.monotonic() + 10
    while True:
        logs = server.logs()
        lines = [json.loads(line) for line in logs.splitlines() if line.startswith('{"request_id":')]
        if len(lines) >= len(answers) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert sorted((line["request_id"], line["status"]) for line in lines) == sorted(
        (reply.headers["x-kennel-request-id"], reply.status) for reply in answers)
    assert all(line["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "kennel/Endpoint" for line in lines)
    assert "/ping" not in logs
