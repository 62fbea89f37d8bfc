"""kennel_train.distributed with real peers: gloo ranks as processes on 127.0.0.1.

Each "host" is a spawned process with its own resource view (host names that
are not algo-N, resolved through KENNEL_DIST_ADDRESSES), training a toy model
through the same Group calls the training loop makes.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from kennel_train import distributed
from kennel_train.data import ResumableSampler
from kennel_train.distributed import Cluster, DistributedError, Settings

HOSTS = ("trainer-q9m1", "trainer-b7k2")  # sorted: trainer-b7k2 is the master
SAMPLES = 11  # not a multiple of 2: uneven evaluation shards, one padded training sample
BATCH = 2


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def settings_for(port: int, **overrides) -> Settings:
    values = {"port": port, "addresses": {host: "127.0.0.1" for host in HOSTS}, "rendezvous_timeout_s": 60,
              "collective_timeout_s": 60, "heartbeat_timeout_s": 30, **overrides}
    return Settings(**values)


def toy_host(host: str, port: int, out: str, scenario: str, overrides: dict) -> None:
    """One host's training: 2 epochs of a linear model on SAMPLES index-tagged samples."""
    out_dir = Path(out) / host
    out_dir.mkdir(parents=True, exist_ok=True)
    stop_here = []
    signal.signal(signal.SIGTERM, lambda *_: stop_here.append(True))
    cluster = Cluster(hosts=tuple(sorted(HOSTS)), current_host=host, network_interface="lo")
    settings = settings_for(port, **overrides)
    layout = distributed.plan(cluster, settings, cuda_devices=0)
    group = distributed.join(layout, settings, failure_file=out_dir / "failure")
    record: dict = {"rank": group.rank, "seen": [], "eval_seen": []}
    try:
        torch.manual_seed(100 + group.rank)  # different on purpose: DDP must start from the leader's
        model = group.wrap(torch.nn.Linear(1, 3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        data = TensorDataset(torch.arange(SAMPLES, dtype=torch.float32).unsqueeze(1), torch.arange(SAMPLES) % 3)
        sampler = ResumableSampler(data, shuffle=True, seed=7, rank=group.rank, world_size=group.world_size)
        steps = 0
        for epoch in range(2):
            sampler.set_epoch(epoch)
            seen = []
            for features, labels in DataLoader(data, batch_size=BATCH, sampler=sampler):
                loss = torch.nn.functional.cross_entropy(model(features), labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                seen += features.squeeze(1).int().tolist()
                steps += 1
                if scenario == "sigterm" and group.rank == 1 and steps == 3:
                    os.kill(os.getpid(), signal.SIGTERM)
                if scenario == "die" and group.rank == 1 and steps == 3:
                    (out_dir / "died-at").write_text(str(time.time()))
                    os._exit(3)
                if scenario == "freeze" and group.rank == 1 and steps == 3:
                    os.kill(os.getpid(), signal.SIGSTOP)
                stopping = group.stop_requested(bool(stop_here))
                if stopping:
                    record["stopped"] = {"step": steps, "hosts": stopping}
                    break
            record["seen"].append(seen)
            if "stopped" in record:
                break
        evaluated = [int(x) for x, _ in group.shard(data)]
        record["eval_seen"] = evaluated
        record["eval_total"] = group.all_sum([len(evaluated), sum(evaluated)])
        record["digest"] = distributed.parameter_digest(model)
        record["leader_state"] = group.broadcast({"from": group.rank})
        failure = None
        if group.is_leader:
            (out_dir / "model.pth").write_text("written once")
            if scenario == "sigterm":
                failure = "stopped by SIGTERM; checkpoint saved"
        record["outcome"] = group.finish(failure)
    except RuntimeError as error:
        reason = group.describe(error) or f"unexpected: {error}"
        (out_dir / "failure").write_text(reason)
        (out_dir / "failed-at").write_text(str(time.time()))
        raise SystemExit(1) from None
    group.close()
    (out_dir / "record.json").write_text(json.dumps(record))


def run_hosts(tmp_path, scenario="ok", hosts=HOSTS, wait_s=120, **overrides):
    context = multiprocessing.get_context("spawn")
    port = free_port()
    processes = {host: context.Process(target=toy_host, args=(host, port, str(tmp_path), scenario, overrides))
                 for host in hosts}
    for process in processes.values():
        process.start()
    return processes


def wait_all(processes, timeout_s):
    deadline = time.monotonic() + timeout_s
    for process in processes.values():
        process.join(max(0.1, deadline - time.monotonic()))
    alive = [host for host, process in processes.items() if process.is_alive()]
    for host in alive:
        processes[host].kill()
        processes[host].join()
    return alive


def records(tmp_path):
    return {host: json.loads((tmp_path / host / "record.json").read_text()) for host in HOSTS}


def test_two_hosts_train_one_model_on_disjoint_shards(tmp_path):
    processes = run_hosts(tmp_path)
    assert wait_all(processes, 120) == []
    assert {host: p.exitcode for host, p in processes.items()} == {host: 0 for host in HOSTS}
    result = records(tmp_path)
    leader, other = result["trainer-b7k2"], result["trainer-q9m1"]
    assert (leader["rank"], other["rank"]) == (0, 1)
    for epoch in range(2):
        a, b = leader["seen"][epoch], other["seen"][epoch]
        assert len(a) == len(b) == 6  # ceil(11 / 2): equal steps on every rank
        assert set(a) | set(b) == set(range(SAMPLES))
        assert len(set(a) & set(b)) == 1  # the one sample repeated to even out the shards
    assert leader["seen"][0] != leader["seen"][1]  # set_epoch reshuffles
    # evaluation: every sample exactly once, sums identical everywhere
    assert sorted(leader["eval_seen"] + other["eval_seen"]) == list(range(SAMPLES))
    assert leader["eval_total"] == other["eval_total"] == [SAMPLES, sum(range(SAMPLES))]
    assert leader["digest"] == other["digest"]
    assert leader["leader_state"] == other["leader_state"] == {"from": 0}
    assert leader["outcome"] is None and other["outcome"] is None
    assert (tmp_path / "trainer-b7k2" / "model.pth").exists()
    assert not (tmp_path / "trainer-q9m1" / "model.pth").exists()


def test_sigterm_on_one_host_stops_every_rank_at_the_same_step(tmp_path):
    processes = run_hosts(tmp_path, "sigterm")
    assert wait_all(processes, 120) == []
    result = records(tmp_path)
    assert result["trainer-b7k2"]["stopped"] == result["trainer-q9m1"]["stopped"] == \
        {"step": 3, "hosts": ["trainer-q9m1"]}
    assert result["trainer-b7k2"]["digest"] == result["trainer-q9m1"]["digest"]
    # the leader's failure becomes every host's failure
    assert result["trainer-b7k2"]["outcome"] == "stopped by SIGTERM; checkpoint saved"
    assert result["trainer-q9m1"]["outcome"] == "the leader host trainer-b7k2 failed: stopped by SIGTERM; checkpoint saved"


def test_a_host_that_dies_ends_the_other_with_a_reason_at_once(tmp_path):
    processes = run_hosts(tmp_path, "die", collective_timeout_s=120, heartbeat_timeout_s=120)
    assert wait_all(processes, 60) == []
    assert processes["trainer-q9m1"].exitcode == 3
    assert processes["trainer-b7k2"].exitcode == 1
    reason = (tmp_path / "trainer-b7k2" / "failure").read_text()
    # both hosts are 127.0.0.1 here, but the only peer at that address is the other host
    assert reason.startswith("distributed training stopped on trainer-b7k2 rank 0/2: host trainer-q9m1 left the job")
    # far below both timeouts (120 s): the closed connection is noticed at once
    died_at = float((tmp_path / "trainer-q9m1" / "died-at").read_text())
    assert float((tmp_path / "trainer-b7k2" / "failed-at").read_text()) - died_at < 20


def test_a_frozen_host_is_noticed_by_the_heartbeat_before_the_collective_timeout(tmp_path):
    processes = run_hosts(tmp_path, "freeze", collective_timeout_s=300, heartbeat_timeout_s=3)
    try:
        deadline = time.monotonic() + 60
        while processes["trainer-b7k2"].is_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not processes["trainer-b7k2"].is_alive(), "the leader kept waiting for a frozen peer"
        assert processes["trainer-b7k2"].exitcode == 1
        reason = (tmp_path / "trainer-b7k2" / "failure").read_text()
        assert reason.startswith("host trainer-q9m1 (rank 1) sent no heartbeat for 3 s")
    finally:
        wait_all({"trainer-q9m1": processes["trainer-q9m1"]}, 0)


def test_the_master_gone_ends_the_waiting_host_through_the_watchdog(tmp_path):
    """The master is frozen while the other host waits outside any collective (for the leader's export)."""
    context = multiprocessing.get_context("spawn")
    port = free_port()
    master = context.Process(target=freeze_after_join, args=("trainer-b7k2", port, str(tmp_path)))
    waiter = context.Process(target=freeze_after_join, args=("trainer-q9m1", port, str(tmp_path)))
    master.start()
    waiter.start()
    try:
        waiter.join(60)
        assert waiter.exitcode == 1
        reason = (tmp_path / "trainer-q9m1" / "failure").read_text()
        assert reason.startswith("lost contact with the master host trainer-b7k2 (rank 0)") or \
            reason.startswith("host trainer-b7k2 (rank 0) sent no heartbeat for 3 s"), reason
    finally:
        wait_all({"master": master, "waiter": waiter}, 0)


def freeze_after_join(host: str, port: int, out: str) -> None:
    out_dir = Path(out) / host
    out_dir.mkdir(parents=True)
    cluster = Cluster(hosts=tuple(sorted(HOSTS)), current_host=host, network_interface="lo")
    settings = settings_for(port, heartbeat_timeout_s=3)
    group = distributed.join(distributed.plan(cluster, settings, cuda_devices=0), settings,
                             failure_file=out_dir / "failure")
    if group.is_leader:
        # freeze once the other rank is past the rendezvous (a master lost during it is the
        # rendezvous timeout's case) and waits for the outcome, watched by its watchdog only
        while not (Path(out) / "trainer-q9m1" / "ready").exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGSTOP)
    else:
        (out_dir / "ready").write_text("joined")
    group.finish(None, timeout_s=600)  # waits for the leader's outcome; only the watchdog ends it
    raise SystemExit(0)


def test_rendezvous_names_the_host_that_never_joined(tmp_path):
    settings = settings_for(free_port(), rendezvous_timeout_s=2)
    layout = distributed.plan(Cluster(hosts=HOSTS, current_host="trainer-b7k2", network_interface="lo"),
                              settings, cuda_devices=0)
    started = time.monotonic()
    with pytest.raises(DistributedError, match=r"rendezvous timed out after 2 s .*: trainer-q9m1 \(rank 1\) never joined"):
        distributed.join(layout, settings)
    assert time.monotonic() - started < 10


def test_a_missing_master_is_a_bounded_clear_failure(tmp_path):
    settings = settings_for(free_port(), rendezvous_timeout_s=2)
    layout = distributed.plan(Cluster(hosts=HOSTS, current_host="trainer-q9m1", network_interface="lo"),
                              settings, cuda_devices=0)
    started = time.monotonic()
    with pytest.raises(DistributedError, match=r"cannot reach the master host trainer-b7k2 \(127.0.0.1:\d+\) within 2 s"):
        distributed.join(layout, settings)
    assert time.monotonic() - started < 10


def local_rank_worker(local_rank: int, port: int, out: str) -> int:
    """A host with two processes (the GPU layout, on gloo): each reports its rank, then waits for SIGTERM."""
    stop_here = []
    signal.signal(signal.SIGTERM, lambda *_: stop_here.append(True))
    cluster = Cluster(hosts=("solo-host",), current_host="solo-host", network_interface="lo")
    settings = Settings(port=port, addresses={"solo-host": "127.0.0.1"}, processes_per_host=2,
                        rendezvous_timeout_s=60, heartbeat_timeout_s=30)
    group = distributed.join(distributed.plan(cluster, settings, cuda_devices=0), settings, local_rank)
    Path(out, f"ready-{group.rank}").write_text(str(os.getpid()))
    steps = 0
    while not group.stop_requested(bool(stop_here)):
        steps += 1
        time.sleep(0.05)
    Path(out, f"stopped-{group.rank}").write_text(str(steps))
    group.finish(None)
    group.close()
    return 143  # what a stopped training run exits with


def test_launch_spawns_one_process_per_device_and_forwards_sigterm(tmp_path):
    context = multiprocessing.get_context("spawn")
    parent = context.Process(target=launch_and_exit, args=(free_port(), str(tmp_path)))
    parent.start()
    # Three spawned interpreters each import torch first: minutes on a busy 2-core host.
    deadline = time.monotonic() + 240
    while len(list(tmp_path.glob("ready-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sorted(p.name for p in tmp_path.glob("ready-*")) == ["ready-0", "ready-1"]
    os.kill(parent.pid, signal.SIGTERM)  # only the parent: it must pass it on
    parent.join(60)
    assert parent.exitcode == 143
    steps = {p.name: p.read_text() for p in tmp_path.glob("stopped-*")}
    assert set(steps) == {"stopped-0", "stopped-1"} and len(set(steps.values())) == 1


def launch_and_exit(port: int, out: str) -> None:
    raise SystemExit(distributed.launch(local_rank_worker, 2, (port, out)))
