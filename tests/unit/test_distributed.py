"""kennel_train.distributed without peers: the resource config, settings, layout, names, interfaces."""
from __future__ import annotations

import json
import socket
import time

import pytest
import torch

from kennel_train import distributed, launch
from kennel_train.cluster import (Cluster, DistributedError, Settings, plan, read_cluster, resolve_hosts,
                                  set_network_interface)


def write_config(tmp_path, **content):
    path = tmp_path / "resourceconfig.json"
    path.write_text(json.dumps(content))
    return path


def test_hosts_are_sorted_so_every_host_picks_the_same_master(tmp_path):
    path = write_config(tmp_path, current_host="algo-2-xk2p1", hosts=["algo-2-xk2p1", "algo-1-9qz7a"],
                        network_interface_name="eth0")
    cluster = read_cluster(path)
    assert cluster.hosts == ("algo-1-9qz7a", "algo-2-xk2p1")
    assert cluster.master == "algo-1-9qz7a"
    assert cluster.node_rank == 1
    assert cluster.network_interface == "eth0"


def test_a_missing_resource_config_means_one_host(tmp_path):
    single = read_cluster(tmp_path / "resourceconfig.json")
    assert single.hosts == (socket.gethostname(),)
    assert single.node_rank == 0


@pytest.mark.parametrize("content, words", [
    ({"current_host": "a", "hosts": []}, "'hosts' must be a non-empty list"),
    ({"current_host": "a", "hosts": "a,b"}, "'hosts' must be a non-empty list"),
    ({"current_host": "a", "hosts": ["a", "a"]}, "lists a host twice"),
    ({"current_host": "c", "hosts": ["a", "b"]}, "'current_host' 'c' is not one of"),
    ({"current_host": "a", "hosts": ["a"], "network_interface_name": 7}, "'network_interface_name'"),
])
def test_a_bad_resource_config_is_a_clear_failure(tmp_path, content, words):
    with pytest.raises(DistributedError, match=words):
        read_cluster(write_config(tmp_path, **content))


def test_a_resource_config_that_is_not_json_is_a_clear_failure(tmp_path):
    path = tmp_path / "resourceconfig.json"
    path.write_text("{hosts: [")
    with pytest.raises(DistributedError, match="cannot read resourceconfig.json"):
        read_cluster(path)


def test_settings_default_and_from_environment():
    assert Settings.from_env({}) == Settings()
    settings = Settings.from_env({"KENNEL_DIST_PORT": "7777", "KENNEL_DIST_HEARTBEAT_TIMEOUT": "2.5",
                                  "KENNEL_DIST_PROCESSES_PER_HOST": "2",
                                  "KENNEL_DIST_ADDRESSES": "node-a=127.0.0.1, node-b=10.0.0.2"})
    assert settings.port == 7777
    assert settings.heartbeat_timeout_s == 2.5
    assert settings.processes_per_host == 2
    assert settings.addresses == {"node-a": "127.0.0.1", "node-b": "10.0.0.2"}


@pytest.mark.parametrize("name, value", [
    ("KENNEL_DIST_PORT", "0"), ("KENNEL_DIST_PORT", "http"), ("KENNEL_DIST_PORT", "70000"),
    ("KENNEL_DIST_COLLECTIVE_TIMEOUT", "-1"), ("KENNEL_DIST_RENDEZVOUS_TIMEOUT", "soon"),
    ("KENNEL_DIST_PROCESSES_PER_HOST", "0"), ("KENNEL_DIST_ADDRESSES", "node-a"),
])
def test_a_bad_setting_names_itself(name, value):
    with pytest.raises(DistributedError, match=name):
        Settings.from_env({name: value})


def test_layout_one_process_per_gpu_or_one_per_cpu_host():
    cluster = Cluster(hosts=("h1", "h2", "h3"), current_host="h2")
    cpu = plan(cluster, Settings(), cuda_devices=0)
    assert (cpu.processes_per_host, cpu.world_size, cpu.backend, cpu.rank(0)) == (1, 3, "gloo", 1)
    gpu = plan(cluster, Settings(), cuda_devices=4)
    assert (gpu.processes_per_host, gpu.world_size, gpu.backend) == (4, 12, "nccl")
    assert [gpu.rank(local) for local in range(4)] == [4, 5, 6, 7]
    assert gpu.host_of(7) == "h2" and gpu.host_of(8) == "h3"
    assert not plan(Cluster(hosts=("h1",), current_host="h1"), Settings(), cuda_devices=0).distributed
    assert plan(Cluster(hosts=("h1",), current_host="h1"), Settings(), cuda_devices=2).distributed
    with pytest.raises(DistributedError, match="has 2 GPUs"):
        plan(cluster, Settings(processes_per_host=3), cuda_devices=2)


def test_peer_names_are_retried_until_they_resolve(monkeypatch):
    attempts = {"algo-2-late": 0}
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host == "algo-2-late":
            attempts[host] += 1
            if attempts[host] < 3:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            return real("127.0.0.1", *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    addresses = resolve_hosts(["localhost", "algo-2-late", "node-x"],
                              Settings(addresses={"node-x": "10.1.2.3"}), sleep=lambda s: None)
    assert addresses == {"localhost": "127.0.0.1", "algo-2-late": "127.0.0.1", "node-x": "10.1.2.3"}
    assert attempts["algo-2-late"] == 3


def test_a_name_that_never_resolves_fails_in_bounded_time_and_is_named(monkeypatch):
    now = [0.0]

    def getaddrinfo(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    def sleep(seconds):
        now[0] += seconds

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    with pytest.raises(DistributedError, match=r"algo-7-zz did not resolve within 20 s"):
        resolve_hosts(["algo-7-zz"], Settings(dns_timeout_s=20), sleep=sleep, clock=lambda: now[0])
    assert 20 <= now[0] <= 26  # waited the timeout, not much more


def test_the_interface_from_the_resource_config_is_used_unless_set_explicitly():
    environ: dict[str, str] = {}
    set_network_interface("lo", use_cuda=True, environ=environ)
    assert environ == {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
    environ = {"GLOO_SOCKET_IFNAME": "bond0"}
    set_network_interface("lo", use_cuda=False, environ=environ)
    assert environ == {"GLOO_SOCKET_IFNAME": "bond0"}
    with pytest.raises(DistributedError, match=r"'eth9' from resourceconfig.json does not exist.*lo"):
        set_network_interface("eth9", use_cuda=False, environ={})


def test_one_process_gets_a_local_group_whose_collectives_are_local():
    layout = plan(Cluster(hosts=("solo",), current_host="solo"), Settings(), cuda_devices=0)
    group = distributed.join(layout, Settings())
    model = torch.nn.Linear(3, 2)
    assert group.is_leader and not group.distributed
    assert group.wrap(model) is model
    data = list(range(5))
    assert group.shard(data) is data
    assert group.all_sum([1.5, 2]) == [1.5, 2.0]
    assert group.stop_requested(False) == []
    assert group.stop_requested(True) == ["solo"]
    assert group.broadcast({"epoch": 3}) == {"epoch": 3}
    assert group.finish(None) is None and group.finish("disk full") == "disk full"


def test_parameter_digest_sees_every_parameter():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    before = distributed.parameter_digest(model)
    assert distributed.parameter_digest(model) == before
    with torch.no_grad():
        model[1].bias[0] += 1e-6
    assert distributed.parameter_digest(model) != before


def test_a_lost_peer_is_named_by_its_address():
    layout = plan(Cluster(hosts=("algo-1", "algo-2"), current_host="algo-1"), Settings(), cuda_devices=0)
    group = distributed.Group(layout, settings=Settings(addresses={"algo-1": "172.18.0.2", "algo-2": "172.18.0.3"}))
    error = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error "
                         "[172.18.0.3]:45735: Connection reset by peer. This is typically caused by ...")
    reason = group.describe(error)
    assert reason.startswith("distributed training stopped on algo-1 rank 0/2: host algo-2 left the job")
    timeout = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 300000ms for recv")
    assert "did not answer within 300 s" in group.describe(timeout)
    assert group.describe(ValueError("bad label")) is None
    assert group.describe(RuntimeError("CUDA out of memory")) is None


def test_rendezvous_errors_name_the_host_and_the_setting():
    settings = Settings(rendezvous_timeout_s=600, port=29500)
    three = plan(Cluster(hosts=("algo-1", "algo-2", "algo-3"), current_host="algo-1"), settings, cuda_devices=0)
    master = "algo-1 (10.0.0.1:29500)"
    timed_out = torch.distributed.DistStoreError("Timed out after 601 seconds waiting for clients. 1/3 clients joined.")
    assert launch._rendezvous_failure(timed_out, three, settings, master) == (
        "rendezvous timed out after 600 s (KENNEL_DIST_RENDEZVOUS_TIMEOUT): algo-2 (rank 1), algo-3 (rank 2) "
        "never joined; see their log")
    # the store counts who came, not who: with one of two missing, both are named as candidates
    one_missing = torch.distributed.DistStoreError(
        "Timed out after 601 seconds waiting for clients. 2/3 clients joined.")
    assert "1 of algo-2, algo-3 never joined" in launch._rendezvous_failure(one_missing, three, settings, master)
    busy = torch.distributed.DistNetworkError("The server socket has failed to listen on any local network address. "
                                              "port: 29500, useIpv6: false, code: -98, name: EADDRINUSE")
    assert launch._rendezvous_failure(busy, three, settings, master).startswith(
        "cannot listen for the other hosts on algo-1 (10.0.0.1:29500): ")
    follower = plan(Cluster(hosts=("algo-1", "algo-2"), current_host="algo-2"), settings, cuda_devices=0)
    unreachable = torch.distributed.DistNetworkError(
        "The client socket has timed out after 600000ms while trying to connect to (10.0.0.1, 29500).")
    assert launch._rendezvous_failure(unreachable, follower, settings, master).startswith(
        "cannot reach the master host algo-1 (10.0.0.1:29500) within 600 s (KENNEL_DIST_RENDEZVOUS_TIMEOUT)")
    gpus = plan(Cluster(hosts=("algo-1", "algo-2"), current_host="algo-1"), settings, cuda_devices=4)
    half = torch.distributed.DistStoreError("Timed out after 601 seconds waiting for clients. 1/2 clients joined.")
    assert "algo-2 (ranks 4-7) never joined; see its log" in launch._rendezvous_failure(half, gpus, settings, master)


def test_the_earliest_recorded_reason_is_the_root_cause(tmp_path, monkeypatch):
    def record(local_rank: int, reason: str, at: int) -> None:
        error_file = tmp_path / "kennel_x" / "attempt_0" / str(local_rank) / "error.json"
        error_file.parent.mkdir(parents=True)
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
        monkeypatch.setattr(time, "time", lambda: at)
        launch.record_failure(reason)

    assert launch._root_cause(str(tmp_path)) is None
    record(0, "distributed training stopped on algo-1 rank 0/4: a peer host did not answer within 300 s", 1300)
    record(1, "out of memory (batch_size=512, ...): lower batch_size", 1000)
    record(2, "the leader host algo-1 failed: ...", 1300)
    assert launch._root_cause(str(tmp_path)) == "out of memory (batch_size=512, ...): lower batch_size"
    # a half-written file (its process killed while writing) is not a reason
    (tmp_path / "kennel_x" / "attempt_0" / "3").mkdir()
    (tmp_path / "kennel_x" / "attempt_0" / "3" / "error.json").write_text('{"message": ')
    assert launch._root_cause(str(tmp_path)) == "out of memory (batch_size=512, ...): lower batch_size"


def test_outside_the_agent_recording_a_reason_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    monkeypatch.chdir(tmp_path)
    launch.record_failure("anything")
    assert list(tmp_path.iterdir()) == []
