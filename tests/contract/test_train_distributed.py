"""Data-parallel training across two hosts, on this machine: the real toolkit's ``train``, real gloo.

Each host is a `train` process with its own SAGEMAKER_BASE_DIR (its own
resourceconfig.json, model, output and checkpoint folders) and the same data
folder, as SageMaker lays out a two-instance job. The host names are not
algo-N (SageMaker local mode adds random suffixes); KENNEL_DIST_ADDRESSES maps
them to 127.0.0.1, as DNS maps them to the instances on SageMaker. Each host is
pinned to its own core, so the pair is two 1-CPU hosts.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kennel_train import distributed
from kennel_train.model import build_network
from kennel_train.sample import generate
from kennel_ops.ports import free_port

REPO = Path(__file__).resolve().parents[2]
TRAIN = Path(sys.executable).with_name("train")  # the sagemaker-training toolkit's entry point
HOSTS = ["trainer-q9m1", "trainer-b7k2"]  # resourceconfig order; sorted, trainer-b7k2 is the leader
LEADER, FOLLOWER = "trainer-b7k2", "trainer-q9m1"
TRAIN_IMAGES, VALID_IMAGES, TEST_IMAGES = 24, 9, 9  # 3 classes x 8 / 3 / 3: uneven evaluation shards
HYPERPARAMETERS = {"architecture": '"resnet18"', "pretrained": "false", "epochs": "2", "batch_size": "4",
                   "workers": "0", "progress_interval": "1", "seed": "3"}
RUN_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dogs")
    return generate(root, classes=3, counts={"train": 8, "valid": 3, "test": 3}, size=(96, 72))


class Host:
    """One SageMaker host: its /opt/ml under ``base`` and its `train` process."""

    def __init__(self, root: Path, name: str, dataset: Path, hyperparameters: dict[str, str]):
        self.name = name
        self.base = root / name
        config = self.base / "input" / "config"
        config.mkdir(parents=True, exist_ok=True)
        (config / "resourceconfig.json").write_text(json.dumps(
            {"current_host": name, "hosts": HOSTS, "network_interface_name": "lo"}))
        (config / "hyperparameters.json").write_text(json.dumps(hyperparameters))
        (config / "inputdataconfig.json").write_text(json.dumps({"training": {"TrainingInputMode": "File"}}))
        channel = self.base / "input" / "data" / "training"
        if not channel.exists():
            channel.parent.mkdir(parents=True, exist_ok=True)
            channel.symlink_to(dataset)
        self.process: subprocess.Popen | None = None
        self.log_path = self.base / "train.log"

    def start(self, port: int, cpu: int, extra_env: dict[str, str]) -> None:
        env = {**os.environ, "SAGEMAKER_BASE_DIR": str(self.base),
               "SAGEMAKER_TRAINING_MODULE": "kennel_train.main:main",
               "PYTHONPATH": os.pathsep.join(str(REPO / p) for p in ("containers/train", "containers/artifact")),
               "KENNEL_DIST_PORT": str(port),
               "KENNEL_DIST_ADDRESSES": ",".join(f"{host}=127.0.0.1" for host in HOSTS),
               "KENNEL_DIST_RENDEZVOUS_TIMEOUT": "120", **extra_env}
        cpus = sorted(os.sched_getaffinity(0))
        core = {cpus[cpu % len(cpus)]}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen([str(TRAIN)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                            preexec_fn=lambda: os.sched_setaffinity(0, core))

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> int:
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"{self.name} ran past {timeout} s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def failure(self) -> str:
        path = self.base / "output" / "failure"
        return path.read_text() if path.exists() else ""

    def files(self, folder: str) -> list[str]:
        root = self.base / folder
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def start(tmp_path: Path, dataset: Path, hyperparameters=HYPERPARAMETERS, **extra_env: str) -> dict[str, Host]:
    hosts = {name: Host(tmp_path, name, dataset, hyperparameters) for name in HOSTS}
    port = free_port()
    for cpu, name in enumerate(HOSTS):
        hosts[name].start(port, cpu, extra_env)
    return hosts


def wait_for_line(host: Host, pattern: str, timeout: float = RUN_TIMEOUT_S) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, host.log(), re.MULTILINE)
        if found:
            return found
        if host.process.poll() is not None:
            pytest.fail(f"{host.name} exited ({host.process.returncode}) before logging {pattern!r}:\n"
                        f"{host.log()[-4000:]}")
        time.sleep(0.2)
    pytest.fail(f"{host.name} did not log {pattern!r} within {timeout} s")


def kill_all(hosts: dict[str, Host]) -> None:
    for host in hosts.values():
        if host.process is not None and host.process.poll() is None:
            host.process.kill()
            host.process.wait()


def metric_lines(log: str) -> list[str]:
    return re.findall(r"^(?:epoch=\d+ (?:train|valid)_loss=.*|Testing (?:Loss|Accuracy): .*)$", log, re.MULTILINE)


def digest_in(log: str) -> str:
    return re.search(r"parameters sha256=(\w+)", log).group(1)


def test_two_hosts_train_one_model_on_their_halves_and_the_leader_writes_it(tmp_path, dataset):
    hosts = start(tmp_path, dataset)
    try:
        codes = {name: host.wait() for name, host in hosts.items()}
    finally:
        kill_all(hosts)
    logs = {name: host.log() for name, host in hosts.items()}
    assert codes == {LEADER: 0, FOLLOWER: 0}, logs
    for name in HOSTS:
        assert f"{name} rank {HOSTS[::-1].index(name)}/2: joined (gloo on lo)" in logs[name]
    # each rank processed its half of every epoch; evaluation shards differ by one image
    shares = {name: re.findall(r"epoch=(\d) processed train_images=(\d+) of (\d+) valid_images=(\d+) of (\d+)",
                               logs[name]) for name in HOSTS}
    assert shares[LEADER] == [("1", "12", "24", "5", "9"), ("2", "12", "24", "5", "9")]
    assert shares[FOLLOWER] == [("1", "12", "24", "4", "9"), ("2", "12", "24", "4", "9")]
    for name in HOSTS:
        assert re.findall(r"progress train epoch=\d/2 done images=(\d+)", logs[name]) == ["12", "12"]
    # the logged metrics are global (reduced over both ranks): identical on both hosts
    assert metric_lines(logs[LEADER]) == metric_lines(logs[FOLLOWER])
    assert len(metric_lines(logs[LEADER])) == 6
    # the same parameters on both ranks at the end, and they are the artifact's
    assert digest_in(logs[LEADER]) == digest_in(logs[FOLLOWER])
    network = build_network("resnet18", "original", 3)
    network.load_state_dict(torch.load(hosts[LEADER].base / "model" / "model.pth", weights_only=True))
    assert distributed.parameter_digest(network) == digest_in(logs[LEADER])
    # the leader alone wrote the model, the reports and the checkpoints
    assert {"kennel.json", "model.onnx", "model.pth"} <= set(hosts[LEADER].files("model"))
    assert hosts[FOLLOWER].files("model") == []
    assert hosts[FOLLOWER].files("checkpoints") == []
    assert [f for f in hosts[FOLLOWER].files("output") if f != "success"] == []
    assert "epoch-0002.pt" in hosts[LEADER].files("checkpoints")
    metrics = json.loads((hosts[LEADER].base / "output" / "data" / "metrics.json").read_text())
    assert metrics["test"]["images"] == TEST_IMAGES  # every test image once, none twice
    assert metrics["runtime"]["world_size"] == 2


def test_sigterm_on_one_host_stops_both_and_the_rerun_resumes_on_both(tmp_path, dataset):
    hosts = start(tmp_path, dataset)
    try:
        wait_for_line(hosts[FOLLOWER], r"^progress train epoch=1/2 step=1/3")
        hosts[FOLLOWER].process.send_signal(signal.SIGTERM)  # only the follower: the leader must stop too
        codes = {name: host.wait() for name, host in hosts.items()}
    finally:
        kill_all(hosts)
    assert codes[LEADER] != 0 and codes[FOLLOWER] != 0
    # on a loaded host the stop may be seen only after the last train step, during validation:
    # both ranks must still agree on where they stopped
    stopped = {name: re.search(r"stopped by SIGTERM on trainer-q9m1 at epoch 1 step (\d) \((?:train|valid)\)",
                               host.failure())
               for name, host in hosts.items()}
    assert stopped[LEADER] and stopped[FOLLOWER], {name: host.failure() for name, host in hosts.items()}
    step = int(stopped[LEADER].group(1))
    assert int(stopped[FOLLOWER].group(1)) == step  # the same step on both ranks
    checkpoint_name = f"epoch-0001-step-{step:06d}.pt"
    assert checkpoint_name in hosts[LEADER].files("checkpoints")
    assert hosts[FOLLOWER].files("checkpoints") == []

    # the job restarts: both hosts resume from the leader's checkpoint and finish
    rerun = start(tmp_path, dataset)
    try:
        codes = {name: host.wait() for name, host in rerun.items()}
    finally:
        kill_all(rerun)
    logs = {name: host.log() for name, host in rerun.items()}
    assert codes == {LEADER: 0, FOLLOWER: 0}, logs
    for name in HOSTS:
        assert f"resuming from checkpoint {checkpoint_name} (epoch 1 step {step})" in logs[name]
        # epoch 1 counts the positions before and after the stop: still this rank's half
        assert re.findall(r"epoch=(\d) processed train_images=(\d+) of 24", logs[name])[-2:] == [("1", "12"),
                                                                                                   ("2", "12")]
    assert digest_in(logs[LEADER]) == digest_in(logs[FOLLOWER])
    metrics = json.loads((rerun[LEADER].base / "output" / "data" / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["epochs"]] == [1, 2]


def test_a_dead_leader_ends_the_other_host_with_a_reason_in_bounded_time(tmp_path, dataset):
    hosts = start(tmp_path, dataset, KENNEL_DIST_COLLECTIVE_TIMEOUT="300", KENNEL_DIST_HEARTBEAT_TIMEOUT="20")
    try:
        wait_for_line(hosts[FOLLOWER], r"^progress train epoch=1/2 step=1/3")
        hosts[LEADER].process.kill()
        killed_at = time.monotonic()
        code = hosts[FOLLOWER].wait(timeout=120)
        ended_in = time.monotonic() - killed_at
    finally:
        kill_all(hosts)
    assert code != 0
    reason = hosts[FOLLOWER].failure()
    assert re.match(r"(distributed training stopped on trainer-q9m1 rank 1/2: host trainer-b7k2 left the job"
                    r"|lost contact with the master host trainer-b7k2)", reason), reason
    # far below the collective timeout (300 s): the closed connection is noticed at once
    assert ended_in < 60, ended_in


def test_hosts_that_see_different_data_fail_before_training(tmp_path, dataset, tmp_path_factory):
    partial = tmp_path_factory.mktemp("partial-copy")
    generate(partial, classes=3, counts={"train": 7, "valid": 3, "test": 3}, size=(96, 72))
    hosts = {name: Host(tmp_path, name, partial if name == FOLLOWER else dataset, HYPERPARAMETERS) for name in HOSTS}
    port = free_port()
    for cpu, name in enumerate(HOSTS):
        hosts[name].start(port, cpu, {})
    try:
        codes = {name: host.wait() for name, host in hosts.items()}
    finally:
        kill_all(hosts)
    assert codes[LEADER] != 0 and codes[FOLLOWER] != 0
    for host in hosts.values():
        assert host.failure().startswith("the hosts see different data: trainer-b7k2 has 3 classes, train 24, "
                                         "valid 9, test 9 (sha256 "), host.failure()
        assert "trainer-q9m1 has 3 classes, train 21, valid 9, test 9" in host.failure()
        assert "S3DataDistributionType FullyReplicated" in host.failure()
    assert hosts[LEADER].files("model") == []
