"""kennel_train.launch and kennel_train.distributed with real peers: gloo ranks as processes on 127.0.0.1.

Each "host" is a spawned process with its own resource view (host names that
are not algo-N, resolved through KENNEL_DIST_ADDRESSES) that starts its ranks
through the launcher, as main() does: torchrun's agent, its rendezvous and its
error files. Each rank trains a toy model through the same Group calls the
training loop makes; the host writes the one reason the launcher returns.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from kennel_train import distributed, launch
from kennel_train.data import ResumableSampler
from kennel_train.cluster import Cluster, Settings
from kennel_ops.ports import free_port

HOSTS = ("trainer-q9m1", "trainer-b7k2")  # sorted: trainer-b7k2 is the master
HOSTS_BY_RANK = tuple(sorted(HOSTS))
SAMPLES = 11  # not a multiple of 2: uneven evaluation shards, one padded training sample
BATCH = 2


def settings_for(port: int, **overrides) -> Settings:
    values = {"port": port, "addresses": {host: "127.0.0.1" for host in HOSTS}, "rendezvous_timeout_s": 60,
              "collective_timeout_s": 60, "heartbeat_timeout_s": 30, **overrides}
    return Settings(**values)


def toy_host(host: str, port: int, out: str, scenario: str, overrides: dict) -> None:
    """One host: its processes started by the launcher (torchrun's agent); its one reason written as main() does."""
    out_dir = Path(out) / host
    out_dir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(hosts=tuple(sorted(HOSTS)), current_host=host, network_interface="lo")
    settings = settings_for(port, **overrides)
    layout = distributed.plan(cluster, settings, cuda_devices=0)
    target = freeze_after_join if scenario == "freeze-after-join" else toy_rank
    code, reason = launch.launch(target, layout, settings, (out, scenario))
    if reason:
        (out_dir / "failure").write_text(reason)
    raise SystemExit(code)


def toy_rank(local_rank: int, layout, settings, out: str, scenario: str) -> tuple[int, str | None]:
    """One rank's training: 2 epochs of a linear model on SAMPLES index-tagged samples."""
    stop_here = []
    signal.signal(signal.SIGTERM, lambda *_: stop_here.append(True))
    group = distributed.join(layout, settings, local_rank)
    out_dir = Path(out) / f"{group.host}-{group.rank}"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "pid").write_text(str(os.getpid()))
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
                    os.kill(os.getppid(), signal.SIGTERM)  # this host's agent: it passes SIGTERM on
                    deadline = time.monotonic() + 60
                    while not stop_here and time.monotonic() < deadline:
                        time.sleep(0.05)
                if scenario == "die" and group.rank == 1 and steps == 3:
                    (out_dir / "died-at").write_text(str(time.time()))
                    os._exit(3)
                if scenario == "freeze" and group.rank == 1 and steps == 3:
                    os.kill(os.getpid(), signal.SIGSTOP)
                if scenario == "fail" and group.rank == 1 and steps == 3:
                    raise ValueError("disk on fire")
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
    except (RuntimeError, ValueError) as error:
        (out_dir / "failed-at").write_text(str(time.time()))
        reason = group.describe(error) or f"unexpected: {error}"
        group.finish(reason)
        return 1, reason
    group.close()
    (out_dir / "record.json").write_text(json.dumps(record))
    if record["outcome"]:
        return (143 if "stopped" in record else 1), record["outcome"]
    return 0, None


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
    return {host: json.loads((tmp_path / f"{host}-{HOSTS_BY_RANK.index(host)}" / "record.json").read_text())
            for host in HOSTS}


def test_two_hosts_train_one_model_on_disjoint_shards(tmp_path):
    processes = run_hosts(tmp_path)
    assert wait_all(processes, 180) == []
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
    assert (tmp_path / "trainer-b7k2-0" / "model.pth").exists()
    assert not (tmp_path / "trainer-q9m1-1" / "model.pth").exists()
    assert not any((tmp_path / host / "failure").exists() for host in HOSTS)


def test_sigterm_on_one_host_stops_every_rank_at_the_same_step(tmp_path):
    processes = run_hosts(tmp_path, "sigterm")
    assert wait_all(processes, 180) == []
    result = records(tmp_path)
    assert result["trainer-b7k2"]["stopped"] == result["trainer-q9m1"]["stopped"] == \
        {"step": 3, "hosts": ["trainer-q9m1"]}
    assert result["trainer-b7k2"]["digest"] == result["trainer-q9m1"]["digest"]
    # the leader's failure becomes every host's failure, and every host exits as a stop does
    assert result["trainer-b7k2"]["outcome"] == "stopped by SIGTERM; checkpoint saved"
    assert result["trainer-q9m1"]["outcome"] == \
        "the leader host trainer-b7k2 failed: stopped by SIGTERM; checkpoint saved"
    assert (tmp_path / "trainer-b7k2" / "failure").read_text() == "stopped by SIGTERM; checkpoint saved"
    assert (tmp_path / "trainer-q9m1" / "failure").read_text() == \
        "the leader host trainer-b7k2 failed: stopped by SIGTERM; checkpoint saved"
    assert {host: p.exitcode for host, p in processes.items()} == {host: 143 for host in HOSTS}


def test_a_host_that_dies_ends_the_other_with_a_reason_at_once(tmp_path):
    processes = run_hosts(tmp_path, "die", collective_timeout_s=120, heartbeat_timeout_s=120)
    assert wait_all(processes, 90) == []
    assert processes["trainer-q9m1"].exitcode == 3
    assert processes["trainer-b7k2"].exitcode == 1
    reason = (tmp_path / "trainer-b7k2" / "failure").read_text()
    # both hosts are 127.0.0.1 here, but the only peer at that address is the other host
    assert reason.startswith("distributed training stopped on trainer-b7k2 rank 0/2: host trainer-q9m1 left the job")
    # far below both timeouts (120 s): the closed connection is noticed at once
    died_at = float((tmp_path / "trainer-q9m1-1" / "died-at").read_text())
    assert float((tmp_path / "trainer-b7k2-0" / "failed-at").read_text()) - died_at < 20
    # the process that died said nothing: its host still reports one line, from the agent
    assert (tmp_path / "trainer-q9m1" / "failure").read_text() == (
        "the training process of rank 1 on trainer-q9m1 ended with exit code 3 without reporting why; "
        "see this host's log")


def test_a_frozen_host_is_noticed_by_the_heartbeat_before_the_collective_timeout(tmp_path):
    processes = run_hosts(tmp_path, "freeze", collective_timeout_s=300, heartbeat_timeout_s=3)
    try:
        deadline = time.monotonic() + 90
        while processes["trainer-b7k2"].is_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not processes["trainer-b7k2"].is_alive(), "the leader kept waiting for a frozen peer"
        assert processes["trainer-b7k2"].exitcode == 1
        reason = (tmp_path / "trainer-b7k2" / "failure").read_text()
        assert reason.startswith("host trainer-q9m1 (rank 1) sent no heartbeat for 3 s")
    finally:
        wait_all({"trainer-q9m1": processes["trainer-q9m1"]}, 0)
    # the frozen process does not outlive its host's launcher
    frozen = int((tmp_path / "trainer-q9m1-1" / "pid").read_text())
    assert wait_gone(frozen, 10), "the frozen training process outlived its launcher"


def wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.1)
    return False


def test_the_master_gone_ends_the_waiting_host_through_the_watchdog(tmp_path):
    """The master's process is frozen while the other host waits outside any collective (for the leader's export)."""
    processes = run_hosts(tmp_path, "freeze-after-join", heartbeat_timeout_s=3)
    try:
        processes["trainer-q9m1"].join(90)
        assert processes["trainer-q9m1"].exitcode == 1
        reason = (tmp_path / "trainer-q9m1" / "failure").read_text()
        assert reason.startswith("lost contact with the master host trainer-b7k2 (rank 0)") or \
            reason.startswith("host trainer-b7k2 (rank 0) sent no heartbeat for 3 s"), reason
    finally:
        wait_all(processes, 0)


def freeze_after_join(local_rank: int, layout, settings, out: str, _scenario: str) -> tuple[int, str | None]:
    group = distributed.join(layout, settings, local_rank)
    if group.is_leader:
        # freeze once the other rank is past the rendezvous (a master lost during it is the
        # rendezvous timeout's case) and waits for the outcome, watched by its watchdog only
        while not (Path(out) / "ready").exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGSTOP)
    else:
        (Path(out) / "ready").write_text("joined")
    return 0, group.finish(None, timeout_s=600)  # waits for the leader's outcome; only the watchdog ends it


def test_a_failure_on_one_rank_is_the_reason_not_its_echo_on_the_others(tmp_path):
    """Rank 1 fails on its own; rank 0 then times out waiting for it: the host reports rank 1's reason."""
    port = free_port()
    parent = multiprocessing.get_context("spawn").Process(target=one_host_two_ranks,
                                                          args=(port, str(tmp_path), "fail"))
    parent.start()
    parent.join(180)
    assert parent.exitcode == 1
    assert (tmp_path / "failure").read_text() == "unexpected: disk on fire"
    assert (tmp_path / "solo-host-0" / "failed-at").exists()  # rank 0 failed too, later: not the reason


def one_host_two_ranks(port: int, out: str, scenario: str) -> None:
    cluster = Cluster(hosts=("solo-host",), current_host="solo-host", network_interface="lo")
    settings = Settings(port=port, addresses={"solo-host": "127.0.0.1"}, processes_per_host=2,
                        rendezvous_timeout_s=60, heartbeat_timeout_s=30, collective_timeout_s=3)
    code, reason = launch.launch(toy_rank, distributed.plan(cluster, settings, cuda_devices=0), settings,
                                 (out, scenario))
    if reason:
        Path(out, "failure").write_text(reason)
    raise SystemExit(code)


def test_rendezvous_names_the_host_that_never_joined(tmp_path):
    settings = settings_for(free_port(), rendezvous_timeout_s=2)
    layout = distributed.plan(Cluster(hosts=HOSTS, current_host="trainer-b7k2", network_interface="lo"),
                              settings, cuda_devices=0)
    started = time.monotonic()
    code, reason = launch.launch(toy_rank, layout, settings, (str(tmp_path), "ok"))
    assert code == 1
    assert re.match(r"rendezvous timed out after 2 s .*: trainer-q9m1 \(rank 1\) never joined; see its log", reason)
    assert time.monotonic() - started < 15


def test_a_missing_master_is_a_bounded_clear_failure(tmp_path):
    settings = settings_for(free_port(), rendezvous_timeout_s=2)
    layout = distributed.plan(Cluster(hosts=HOSTS, current_host="trainer-q9m1", network_interface="lo"),
                              settings, cuda_devices=0)
    started = time.monotonic()
    code, reason = launch.launch(toy_rank, layout, settings, (str(tmp_path), "ok"))
    assert code == 1
    assert re.match(r"cannot reach the master host trainer-b7k2 \(127.0.0.1:\d+\) within 2 s", reason), reason
    assert time.monotonic() - started < 15


def local_rank_worker(local_rank: int, layout, settings, out: str) -> tuple[int, str | None]:
    """A host with two processes (the GPU layout, on gloo): each reports its rank, then waits for SIGTERM."""
    stop_here = []
    signal.signal(signal.SIGTERM, lambda *_: stop_here.append(True))
    group = distributed.join(layout, settings, local_rank)
    Path(out, f"ready-{group.rank}").write_text(str(os.getpid()))
    steps = 0
    while not group.stop_requested(bool(stop_here)):
        steps += 1
        time.sleep(0.05)
    Path(out, f"stopped-{group.rank}").write_text(str(steps))
    outcome = group.finish("stopped by SIGTERM" if group.is_leader else None)
    group.close()
    return 143, outcome  # what a stopped training run exits with


def test_launch_spawns_one_process_per_device_and_forwards_sigterm(tmp_path):
    context = multiprocessing.get_context("spawn")
    parent = context.Process(target=launch_and_exit, args=(free_port(), str(tmp_path)))
    parent.start()
    # Four interpreters (the test's host, the agent's processes) each import torch first: minutes on a busy 2-core host.
    deadline = time.monotonic() + 240
    while len(list(tmp_path.glob("ready-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sorted(p.name for p in tmp_path.glob("ready-*")) == ["ready-0", "ready-1"]
    os.kill(parent.pid, signal.SIGTERM)  # only the parent: it must pass it on
    parent.join(120)
    assert parent.exitcode == 143
    steps = {p.name: p.read_text() for p in tmp_path.glob("stopped-*")}
    assert set(steps) == {"stopped-0", "stopped-1"} and len(set(steps.values())) == 1
    assert (tmp_path / "failure").read_text() == "stopped by SIGTERM"  # the leader's, once


def launch_and_exit(port: int, out: str) -> None:
    cluster = Cluster(hosts=("solo-host",), current_host="solo-host", network_interface="lo")
    settings = Settings(port=port, addresses={"solo-host": "127.0.0.1"}, processes_per_host=2,
                        rendezvous_timeout_s=60, heartbeat_timeout_s=30)
    code, reason = launch.launch(local_rank_worker, distributed.plan(cluster, settings, cuda_devices=0), settings,
                                 (out,))
    if reason:
        Path(out, "failure").write_text(reason)
    raise SystemExit(code)
