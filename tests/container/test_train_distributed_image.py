"""Two hosts in containers: compose.yaml's `distributed` profile, algo-1 and algo-2 on the compose network.

The README's `make train-distributed` is `docker compose --profile distributed
up algo-1 algo-2`; here it runs under its own project name with its folders in
a temporary directory, on the bundled sample (5 breeds, 80 training images).
"""
from __future__ import annotations

import json
import re
import time

import pytest

pytestmark = pytest.mark.container

HOSTS = ("algo-1", "algo-2")
QUICK = {"KENNEL_EPOCHS": "2", "KENNEL_WORKERS": "0", "KENNEL_PROGRESS_INTERVAL": "1",
         "KENNEL_DIST_RENDEZVOUS_TIMEOUT": "300"}


def states(project) -> dict[str, dict]:
    lines = project.run("--profile", "distributed", "ps", "--all", "--format", "json", *HOSTS, timeout=60).stdout
    return {state["Service"]: state for state in map(json.loads, lines.splitlines())}


def logs_of(project, service: str) -> str:
    return project.run("--profile", "distributed", "logs", "--no-color", "--no-log-prefix", service, timeout=60).stdout


def wait_until(condition, timeout_s: float, what: str, interval_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    pytest.fail(f"{what} within {timeout_s:.0f} s", pytrace=False)


def test_two_hosts_train_one_model_and_the_leader_writes_it(compose_project, tmp_path):
    project = compose_project(**QUICK)
    project.run("--profile", "distributed", "up", *HOSTS, timeout=1200)
    state, logs = states(project), {host: logs_of(project, host) for host in HOSTS}
    assert {host: state[host]["ExitCode"] for host in HOSTS} == {"algo-1": 0, "algo-2": 0}, logs["algo-2"][-3000:]
    assert "algo-1 rank 0/2: joined (gloo on eth0)" in logs["algo-1"]
    assert "algo-2 rank 1/2: joined (gloo on eth0)" in logs["algo-2"]
    # each host trained on its half of every epoch (80 images, 20 for validation)
    for host in HOSTS:
        shares = re.findall(r"epoch=(\d) processed train_images=(\d+) of (\d+) valid_images=(\d+) of (\d+)", logs[host])
        assert shares == [("1", "40", "80", "10", "20"), ("2", "40", "80", "10", "20")], logs[host][-3000:]
    # one model: the same parameters on both hosts, global metrics on both
    digests = {host: re.search(r"parameters sha256=(\w+)", logs[host]).group(1) for host in HOSTS}
    assert digests["algo-1"] == digests["algo-2"]
    testing = {host: re.findall(r"^Testing (?:Loss|Accuracy): .*$", logs[host], re.MULTILINE) for host in HOSTS}
    assert testing["algo-1"] == testing["algo-2"] and len(testing["algo-1"]) == 2
    # written once, by the leader, into the one model folder
    assert "model written to /opt/ml/model" in logs["algo-1"]
    assert "model written to" not in logs["algo-2"]
    assert {"kennel.json", "model.onnx", "model.pth"} <= {p.name for p in (tmp_path / "model").iterdir()}
    metrics = json.loads((tmp_path / "output" / "algo-1" / "data" / "metrics.json").read_text())
    assert metrics["runtime"]["world_size"] == 2 and metrics["test"]["images"] == 20
    assert not (tmp_path / "output" / "algo-2" / "data").exists()
    assert not any((tmp_path / "output" / host / "failure").exists() for host in HOSTS)
    # the job's own checkpoint folder (a single-host run's is ./checkpoints)
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "distributed").glob("*.pt")) == \
        ["epoch-0001.pt", "epoch-0002.pt"]


def test_killing_one_host_ends_the_other_with_a_reason_in_bounded_time(compose_project, tmp_path):
    project = compose_project(**QUICK, KENNEL_DIST_COLLECTIVE_TIMEOUT="600", KENNEL_DIST_HEARTBEAT_TIMEOUT="60")
    project.run("--profile", "distributed", "up", "--detach", *HOSTS, timeout=600)
    wait_until(lambda: "progress train epoch=1/2 step=1/" in logs_of(project, "algo-2"), 600,
               "algo-2 did not start training")
    project.run("--profile", "distributed", "kill", "algo-2", timeout=60)  # SIGKILL: no goodbye
    killed_at = time.monotonic()
    wait_until(lambda: states(project)["algo-1"]["State"] == "exited", 120,
               "algo-1 kept running after algo-2 died")
    ended_in = time.monotonic() - killed_at
    state = states(project)
    logs = logs_of(project, "algo-1")
    assert state["algo-1"]["ExitCode"] != 0, logs[-3000:]
    reason = (tmp_path / "output" / "algo-1" / "failure").read_text()
    # the peer is named (its address is algo-2's on the compose network), in one line
    assert reason.startswith("distributed training stopped on algo-1 rank 0/2: host algo-2 left the job"), reason
    assert "\n" not in reason.strip() and len(reason) <= 1024
    # far below the collective and heartbeat timeouts (600 s, 60 s): the closed connection tells at once
    assert ended_in < 45, ended_in
    assert not (tmp_path / "model" / "kennel.json").exists()
