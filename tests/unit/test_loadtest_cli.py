"""kennel-loadtest (kennel_ops/loadtest.py) end to end against a real local HTTP server (--url mode)."""
import json
import math
import subprocess
import sys

import pytest

from kennel_ops import loadtest
from loadtest_server import CapacityServer



def test_loadtest_finds_the_capacity_and_writes_report_and_plot(tmp_path, capsys):
    # 2 slots x 100 ms = 20 requests/s; p99 target 0.35 s lets 2 and 4 clients pass.
    with CapacityServer(slots=2, service_s=0.1) as server:
        code = loadtest.main(["--url", server.url, "--concurrency", "1,2,4,8,16", "--step-seconds", "2",
                              "--target-p99", "0.35", "--images", "2", "--warmup-requests", "4",
                              "--report", str(tmp_path / "r.json"), "--plot", str(tmp_path / "p.png")])
        sent = server.count
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    rate = report["max_sustainable_rps"]
    assert 14 <= rate <= 20.5
    assert report["recommended_invocations_per_instance"] == math.floor(rate * 60 * 0.5)
    steps = report["configurations"][0]["steps"]
    assert [s["concurrency"] for s in steps][:3] == [1, 2, 4]
    assert sum(s["requests"] for s in steps) + 4 == sent  # nothing unaccounted for
    assert all(0 <= s["client_cpu_percent"] < 200 and s["host_load"] >= 0 for s in steps)
    assert all(s["cpu_percent"] is None for s in steps)  # no container named: not measured, not invented
    assert report["best_configuration"]["label"] == "image defaults"
    assert report["settings"]["payload"]["images"] == 2
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    # the autoscale command takes its target from this very file
    from kennel_ops.aws.autoscale import target_from_report
    assert target_from_report(tmp_path / "r.json") == report["recommended_invocations_per_instance"]
    assert "recommended SageMakerVariantInvocationsPerInstance: " in out
    assert f"{report['recommended_invocations_per_instance']} (= {rate:.2f} x 60 x 0.5)" in out


def test_a_container_that_cannot_be_sampled_is_a_warning_not_a_failure(tmp_path, capsys):
    with CapacityServer(slots=2, service_s=0.05) as server:
        code = loadtest.main(["--url", server.url, "--container", "kennel-no-such-container-here",
                              "--concurrency", "1", "--step-seconds", "1", "--warmup-requests", "1",
                              "--report", str(tmp_path / "r.json"), "--plot", str(tmp_path / "p.png")])
    assert code == 0
    assert "no CPU/memory samples from container kennel-no-such-container-here" in capsys.readouterr().err
    step = json.loads((tmp_path / "r.json").read_text())["configurations"][0]["steps"][0]
    assert step["cpu_percent"] is None and step["memory_mib"] is None


def test_no_passing_step_exits_non_zero_without_a_recommendation(tmp_path, capsys):
    with CapacityServer(slots=1, service_s=0.05, fail_every=3) as server:
        code = loadtest.main(["--url", server.url, "--concurrency", "1,2", "--step-seconds", "1",
                              "--warmup-requests", "1", "--images", "1",
                              "--report", str(tmp_path / "r.json"), "--plot", str(tmp_path / "p.png")])
    assert code == 1
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["recommended_invocations_per_instance"] is None
    assert report["configurations"][0]["stopped_because"].startswith("concurrency 1: success")
    assert "no step kept 100% success" in capsys.readouterr().out
    from kennel_ops.aws.autoscale import target_from_report
    from kennel_ops.aws.context import CliError
    with pytest.raises(CliError, match="must be a positive number"):
        target_from_report(tmp_path / "r.json")  # autoscale refuses a report without a recommendation


def test_unreachable_endpoint_is_one_readable_line(tmp_path):
    with CapacityServer() as server:
        url = server.url
    result = subprocess.run([sys.executable, "-m", "kennel_ops.loadtest", "--url", url, "--wait", "1",
                             "--report", str(tmp_path / "r.json")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("loadtest: ") and "not healthy" in result.stderr
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--url", "http://127.0.0.1:1/invocations", "--workers", "1,2"], "need a container"),
    (["--safety-factor", "1.5"], "safety-factor"),
    (["--concurrency", "1,x"], "comma-separated"),
])
def test_bad_arguments(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        loadtest.parse_args(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_sweep_configurations():
    args = loadtest.parse_args(["--workers", "1,2", "--threads", "1,2"])
    assert loadtest.configurations(args) == [
        {"SAGEMAKER_MODEL_SERVER_WORKERS": "1", "KENNEL_ORT_THREADS": "1"},
        {"SAGEMAKER_MODEL_SERVER_WORKERS": "1", "KENNEL_ORT_THREADS": "2"},
        {"SAGEMAKER_MODEL_SERVER_WORKERS": "2", "KENNEL_ORT_THREADS": "1"},
        {"SAGEMAKER_MODEL_SERVER_WORKERS": "2", "KENNEL_ORT_THREADS": "2"}]
    assert loadtest.configurations(loadtest.parse_args([])) == [{}]
