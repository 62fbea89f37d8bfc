"""kennel-loadtest --endpoint against moto's SageMaker runtime stand-in (server mode).

moto answers InvokeEndpoint from a queue of results set through its moto-api (one per
distinct body, then the same again), and GetMetricData from the metrics put into it.
Its server reads a request body as UTF-8 text and fails (500, UnicodeDecodeError) on a
JPEG, so these tests send the photos as base64 JSON (--body base64-json), the same
InvokeEndpoint call with a text body.
It computes no percentile statistics (p50, p99 come back empty), so the CloudWatch
section is checked on its Average, Sum and Maximum figures. The load test runs in its
own process, as users run it: Locust monkey-patches the standard library for gevent.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timezone

import pytest
import requests

from aws_testkit import REGION

pytestmark = pytest.mark.aws
ENDPOINT = "kennel"
DIMENSIONS = [{"Name": "EndpointName", "Value": ENDPOINT}, {"Name": "VariantName", "Value": "AllTraffic"}]


def queue_answers(moto, bodies: list[str]) -> None:
    results = [{"Body": body, "ContentType": "application/json", "InvokedProductionVariant": "AllTraffic"}
               for body in bodies]
    requests.post(f"{moto.url}/moto-api/static/sagemaker/endpoint-results", timeout=10,
                  json={"region": REGION, "results": results}).raise_for_status()


def run_endpoint_loadtest(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kennel_ops.loadtest", "--endpoint", ENDPOINT, "--own-endpoint",
                           "--region", REGION, "--cloudwatch-wait", "0", "--warmup-requests", "2",
                           "--body", "base64-json", "--report", str(tmp_path / "r.json"),
                           "--plot", str(tmp_path / "p.png"), *args],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ))


def test_loadtest_invokes_the_endpoint_through_the_runtime_api_and_reads_cloudwatch(moto, aws, tmp_path):
    queue_answers(moto, ['[{"label": "Akita", "probability": 0.9}]'] * 2)  # one per distinct photo
    now = datetime.now(timezone.utc)
    aws("cloudwatch").put_metric_data(Namespace="AWS/SageMaker", MetricData=[
        {"MetricName": "ModelLatency", "Dimensions": DIMENSIONS, "Timestamp": now, "Value": 42000.0,
         "Unit": "Microseconds"},
        {"MetricName": "OverheadLatency", "Dimensions": DIMENSIONS, "Timestamp": now, "Value": 3000.0,
         "Unit": "Microseconds"},
        {"MetricName": "Invocations", "Dimensions": DIMENSIONS, "Timestamp": now, "Value": 30.0, "Unit": "None"}])
    aws("cloudwatch").put_metric_data(Namespace="/aws/sagemaker/Endpoints", MetricData=[
        {"MetricName": "CPUUtilization", "Dimensions": DIMENSIONS, "Timestamp": now, "Value": 85.0,
         "Unit": "Percent"}])

    result = run_endpoint_loadtest(tmp_path, "--images", "2", "--concurrency", "1,2", "--step-seconds", "5",
                          "--step-max-requests", "12", "--target-p99", "5")

    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["url"] == f"SageMaker endpoint {ENDPOINT} in {REGION} (InvokeEndpoint)"
    assert report["settings"]["users"] == ["KennelLoadUser"]
    steps = report["configurations"][0]["steps"]
    assert [(s["concurrency"], s["requests"], s["successes"]) for s in steps] == [(1, 12, 12), (2, 12, 12)]
    assert report["recommended_invocations_per_instance"] > 0
    # (moto's request recording is not read here: concurrent requests interleave its lines)
    cloudwatch = report["configurations"][0]["cloudwatch"]
    metrics = cloudwatch["metrics"]
    assert metrics["ModelLatency"]["Average"]["over_window"] == 42000.0
    assert metrics["OverheadLatency"]["Average"]["over_window"] == 3000.0
    assert metrics["Invocations"]["Sum"]["over_window"] == 30.0
    assert metrics["CPUUtilization"]["Maximum"]["over_window"] == 85.0
    assert cloudwatch["start"] <= now.isoformat() <= cloudwatch["end"]
    # moto fails a GetMetricData with percentiles (500): the other figures stand, the report says so
    assert [p.split(":")[0] for p in cloudwatch["problems"]] == ["percentiles not read"]
    assert "CloudWatch (1 minute(s) so far): ModelLatency p99 -" in result.stdout


def invocation_headers(moto) -> list[dict]:
    """The headers of every InvokeEndpoint moto recorded (lower-case names). Read as a sequence of
    JSON objects: two requests close together can leave two entries on one line."""
    text, decoder, index, found = moto.recording.read_text(), json.JSONDecoder(), 0, []
    while (index := len(text) - len(text[index:].lstrip())) < len(text):
        entry, index = decoder.raw_decode(text, index)
        if entry["url"].endswith(f"/endpoints/{ENDPOINT}/invocations"):
            found.append({key.lower(): value for key, value in entry["headers"].items()})
    return found


def test_loadtest_asks_one_model_of_a_multi_model_endpoint(moto, tmp_path):
    queue_answers(moto, ['[{"label": "Akita", "probability": 0.9}]'])
    moto.reset_recording()
    result = run_endpoint_loadtest(tmp_path, "--target-model", "rex.tar.gz", "--images", "1", "--concurrency", "1",
                                   "--step-seconds", "2", "--step-max-requests", "3")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["url"] == f"SageMaker endpoint {ENDPOINT} in {REGION} (InvokeEndpoint), model rex.tar.gz"
    headers = invocation_headers(moto)
    assert len(headers) == 5  # 2 warm-up requests and the step's 3
    assert {h.get("x-amzn-sagemaker-target-model") for h in headers} == {"rex.tar.gz"}


def test_target_model_goes_with_an_endpoint_only(tmp_path):
    for argv, message in ((["--url", "http://127.0.0.1:9/invocations", "--target-model", "rex.tar.gz"],
                           "--region, --profile and --target-model go with --endpoint"),
                          (["--endpoint", ENDPOINT, "--own-endpoint", "--target-model", "../rex.tar.gz"],
                           "invalid target model")):
        result = subprocess.run([sys.executable, "-m", "kennel_ops.loadtest", *argv], capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 2 and message in result.stderr.splitlines()[-1]


def test_answers_that_are_not_the_models_are_errors_of_the_run(moto, tmp_path):
    # moto's default answer is the text "body": not JSON, so not a kennel answer
    result = run_endpoint_loadtest(tmp_path, "--images", "1", "--concurrency", "1", "--step-seconds", "2")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("loadtest: warm-up requests failed")
    assert "200 with a body that is not JSON" in result.stderr


def test_no_region_is_one_line(moto, tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    result = subprocess.run([sys.executable, "-m", "kennel_ops.loadtest", "--endpoint", ENDPOINT, "--own-endpoint",
                             "--report", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr == "loadtest: no AWS region: pass --region or set AWS_DEFAULT_REGION\n"
