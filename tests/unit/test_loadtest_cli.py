"""kennel-loadtest (kennel_ops/loadtest.py) end to end against a real local HTTP server (--url mode).

The command runs Locust, which monkey-patches the standard library for gevent: it runs
here in its own process (`python -m kennel_ops.loadtest`), as users run it.
"""
import json
import math
import subprocess
import sys
import textwrap

import pytest

from kennel_ops import loadtest
from loadtest_server import CapacityServer


def run_loadtest(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kennel_ops.loadtest", *args], capture_output=True, text=True,
                          timeout=timeout)


def outputs(tmp_path) -> list[str]:
    return ["--report", str(tmp_path / "r.json"), "--plot", str(tmp_path / "p.png")]


def test_loadtest_finds_the_capacity_and_writes_report_and_plot(tmp_path):
    # 2 slots x 100 ms = 20 requests/s; p99 target 0.35 s lets 2 and 4 users pass.
    with CapacityServer(slots=2, service_s=0.1) as server:
        result = run_loadtest("--url", server.url, "--concurrency", "1,2,4,8,16", "--step-seconds", "2",
                              "--target-p99", "0.35", "--images", "2", "--warmup-requests", "4", *outputs(tmp_path))
        sent = server.count
    out = result.stdout
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    rate = report["max_sustainable_rps"]
    assert 14 <= rate <= 20.5
    assert report["recommended_invocations_per_instance"] == math.floor(rate * 60 * 0.5)
    steps = report["configurations"][0]["steps"]
    assert [s["concurrency"] for s in steps][:3] == [1, 2, 4]
    assert sum(s["requests"] for s in steps) + 4 == sent  # nothing unaccounted for
    assert all(s["requests"] == s["successes"] for s in steps if s["concurrency"] <= 4)
    assert all(0.09 <= s["worker_p50"] <= 0.2 for s in steps)  # the server's Server-Timing, read per request
    assert all(0 <= s["client_cpu_percent"] < 200 and s["host_load"] >= 0 for s in steps)
    assert all(s["cpu_percent"] is None for s in steps)  # no container named: not measured, not invented
    assert report["configurations"][0]["precision"] == "int8; setting=auto; speedup=2.50"  # the graph that served
    assert "answered by the INT8 graph" in out
    assert report["best_configuration"]["label"] == "image defaults"
    assert report["settings"]["payload"]["images"] == 2
    assert report["settings"]["engine"].startswith("locust ")
    assert report["configurations"][0]["cloudwatch"] is None
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    # the autoscale command takes its target from this very file
    from kennel_ops.aws.autoscale import target_from_report
    assert target_from_report(tmp_path / "r.json") == report["recommended_invocations_per_instance"]
    assert "recommended SageMakerVariantInvocationsPerInstance: " in out
    assert f"{report['recommended_invocations_per_instance']} (= {rate:.2f} x 60 x 0.5)" in out


def test_a_step_ends_at_its_request_cap_and_counts_every_request(tmp_path):
    with CapacityServer(slots=4, service_s=0.01) as server:
        result = run_loadtest("--url", server.url, "--concurrency", "3", "--step-seconds", "30",
                              "--step-max-requests", "25", "--warmup-requests", "0", *outputs(tmp_path))
        sent = server.count
    assert result.returncode == 0, result.stderr[-3000:]
    step = json.loads((tmp_path / "r.json").read_text())["configurations"][0]["steps"][0]
    assert step["requests"] == 25 == sent and step["duration_s"] < 10


def test_a_step_ends_at_its_deadline_with_slow_answers(tmp_path):
    with CapacityServer(slots=1, service_s=0.3) as server:
        result = run_loadtest("--url", server.url, "--concurrency", "2", "--step-seconds", "0.5",
                              "--warmup-requests", "0", "--target-p99", "5", *outputs(tmp_path))
        sent = server.count
    assert result.returncode == 0, result.stderr[-3000:]
    step = json.loads((tmp_path / "r.json").read_text())["configurations"][0]["steps"][0]
    # no request starts after the deadline; the ones in flight then are waited for and counted
    assert 1 <= step["requests"] == sent <= 4
    assert step["duration_s"] < 0.5 + 2 * 0.3 + 0.5


def test_errors_and_timeouts_are_counted_by_kind(tmp_path):
    with CapacityServer(slots=4, service_s=0.001, fail_every=5) as server:
        result = run_loadtest("--url", server.url, "--concurrency", "2", "--step-seconds", "30",
                              "--step-max-requests", "50", "--warmup-requests", "0", *outputs(tmp_path))
    assert result.returncode == 1  # no passing step
    step = json.loads((tmp_path / "r.json").read_text())["configurations"][0]["steps"][0]
    assert step["requests"] == 50 and step["errors"] == {"http 503": 10} and step["successes"] == 40

    with CapacityServer(hang_s=1.0) as server:
        result = run_loadtest("--url", server.url, "--concurrency", "1", "--step-seconds", "0.3", "--timeout", "0.2",
                              "--warmup-requests", "0", *outputs(tmp_path))
    step = json.loads((tmp_path / "r.json").read_text())["configurations"][0]["steps"][0]
    assert step["requests"] >= 1 and set(step["errors"]) == {"timeout"}


def test_a_locustfile_of_ones_own_runs_in_kennels_ramp_and_report(tmp_path):
    locustfile = tmp_path / "my_users.py"
    locustfile.write_text(textwrap.dedent("""
        from locust import task
        from kennel_ops.load.users import KennelHttpUser

        class PingToo(KennelHttpUser):
            # kennel's invoke task, plus a health check now and then
            @task(3)
            def invoke(self):
                super().invoke()

            @task(1)
            def ping(self):
                with self.plan.request() as body:
                    if body is not None:
                        self.client.get("/ping", name="ping")
    """))
    with CapacityServer(slots=2, service_s=0.01) as server:
        result = run_loadtest("--url", server.url, "--locustfile", str(locustfile), "--concurrency", "1,2",
                              "--step-seconds", "1", "--warmup-requests", "2", "--target-p99", "1",
                              *outputs(tmp_path))
        posts = server.count
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["settings"]["users"] == ["PingToo"]
    steps = report["configurations"][0]["steps"]
    assert sum(s["requests"] for s in steps) + 2 > posts > 0  # the pings are requests the server did not count


def test_the_locustfile_of_the_capacity_page_runs(tmp_path):
    from kennel_ops.checkout import REPO

    page = (REPO / "docs" / "capacity.md").read_text()
    example = page.split("## Your own Locust users", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "top3.py").write_text(example)
    with CapacityServer(slots=2, service_s=0.01) as server:
        result = run_loadtest("--url", server.url, "--locustfile", str(tmp_path / "top3.py"), "--concurrency", "2",
                              "--step-seconds", "1", "--warmup-requests", "0", *outputs(tmp_path))
        sent = server.count
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    step = report["configurations"][0]["steps"][0]
    assert report["settings"]["users"] == ["TopThree"] and step["requests"] == step["successes"] == sent > 0


def test_a_container_that_cannot_be_sampled_is_a_warning_not_a_failure(tmp_path):
    with CapacityServer(slots=2, service_s=0.05) as server:
        result = run_loadtest("--url", server.url, "--container", "kennel-no-such-container-here",
                              "--concurrency", "1", "--step-seconds", "1", "--warmup-requests", "1",
                              *outputs(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no CPU/memory samples from container kennel-no-such-container-here" in result.stderr
    step = json.loads((tmp_path / "r.json").read_text())["configurations"][0]["steps"][0]
    assert step["cpu_percent"] is None and step["memory_mib"] is None


def test_no_passing_step_exits_non_zero_without_a_recommendation(tmp_path):
    with CapacityServer(slots=1, service_s=0.05, fail_every=3) as server:
        result = run_loadtest("--url", server.url, "--concurrency", "1,2", "--step-seconds", "1",
                              "--warmup-requests", "0", "--images", "1", *outputs(tmp_path))
    assert result.returncode == 1
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["recommended_invocations_per_instance"] is None
    assert report["configurations"][0]["stopped_because"].startswith("concurrency 1: success")
    assert "no step kept 100% success" in result.stdout
    from kennel_ops.aws.autoscale import target_from_report
    from kennel_ops.aws.context import CliError
    with pytest.raises(CliError, match="must be a positive number"):
        target_from_report(tmp_path / "r.json")  # autoscale refuses a report without a recommendation


@pytest.mark.parametrize("extra, message", [
    ([], "not healthy"),
    (["--locustfile", "{tmp}/broken.py"], "cannot load"),
])
def test_failures_are_one_readable_line(tmp_path, extra, message):
    (tmp_path / "broken.py").write_text("import no_such_module_here\n")
    with CapacityServer() as server:
        url = server.url
    if message == "cannot load":
        with CapacityServer() as server:
            result = run_loadtest("--url", server.url, *[e.format(tmp=tmp_path) for e in extra], *outputs(tmp_path))
    else:
        result = run_loadtest("--url", url, "--wait", "1", *outputs(tmp_path))
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert result.stderr.startswith("loadtest: ") and message in result.stderr
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--url", "http://127.0.0.1:1/invocations", "--workers", "1,2"], "need a container"),
    (["--endpoint", "kennel", "--threads", "2"], "need a container"),
    (["--safety-factor", "1.5"], "safety-factor"),
    (["--concurrency", "1,x"], "comma-separated"),
    (["--url", "http://192.0.2.10:8080/invocations"], "add --own-endpoint"),
    (["--url", "ftp://127.0.0.1/x"], "http(s) URL"),
    (["--endpoint", "kennel"], "add --own-endpoint"),
    (["--endpoint", "kennel", "--own-endpoint", "--container", "c"], "does not go with --endpoint"),
    (["--region", "eu-west-1"], "go with --endpoint"),
    (["--url", "http://127.0.0.1:1/x", "--endpoint", "kennel"], "not allowed with"),
    (["--locustfile", "/no/such/locustfile.py"], "no such file"),
])
def test_bad_arguments(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        loadtest.parse_args(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_users_own_endpoint_off_this_machine_is_allowed_when_said():
    args = loadtest.parse_args(["--url", "https://192.0.2.10/invocations", "--own-endpoint"])
    assert args.url == "https://192.0.2.10/invocations"
    assert loadtest.is_loopback("127.0.0.1") and loadtest.is_loopback("localhost") and loadtest.is_loopback("::1")
    assert not loadtest.is_loopback("192.0.2.10") and not loadtest.is_loopback("no-such-host.invalid")


def test_sweep_configurations():
    args = loadtest.parse_args(["--workers", "1,2", "--threads", "1,2"])
    assert loadtest.configurations(args) == [
        {"SAGEMAKER_MODEL_SERVER_WORKERS": "1", "KENNEL_ORT_THREADS": "1"},
        {"SAGEMAKER_MODEL_SERVER_WORKERS": "1", "KENNEL_ORT_THREADS": "2"},
        {"SAGEMAKER_MODEL_SERVER_WORKERS": "2", "KENNEL_ORT_THREADS": "1"},
        {"SAGEMAKER_MODEL_SERVER_WORKERS": "2", "KENNEL_ORT_THREADS": "2"}]
    assert loadtest.configurations(loadtest.parse_args([])) == [{}]


def test_importing_the_command_does_not_patch_the_standard_library():
    import socket

    import gevent.socket
    assert socket.socket is not gevent.socket.socket and "locust" not in sys.modules
