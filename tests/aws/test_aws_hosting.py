"""Serverless and asynchronous hosting against moto in server mode: deploy --serverless,
deploy --async (with its endpoint-role permissions), autoscale on the backlog from zero,
invoke-async, teardown.

Everything runs on moto, InvokeEndpointAsync included: moto's runtime answers from a
queue set through its /moto-api/static/sagemaker/async-endpoint-results route and puts
the answer (or failure) object in S3 itself. Each command runs twice (the second
changes nothing) and under --dry-run (nothing but reads reaches moto).
"""
from __future__ import annotations

import json

import pytest
import requests

from aws_testkit import ACCOUNT, BUCKET

pytestmark = pytest.mark.aws

ASYNC_ROOT = f"s3://{BUCKET}/async/"
SUCCESS_TOPIC = f"arn:aws:sns:us-east-1:{ACCOUNT}:kennel-answers"
ERROR_TOPIC = f"arn:aws:sns:us-east-1:{ACCOUNT}:kennel-errors"
RESOURCE_ID = "endpoint/kennel/variant/AllTraffic"
POLL = ["--poll-seconds", "0.01"]


def config_of(aws, endpoint: str = "kennel") -> dict:
    sagemaker = aws("sagemaker")
    name = sagemaker.describe_endpoint(EndpointName=endpoint)["EndpointConfigName"]
    return sagemaker.describe_endpoint_config(EndpointConfigName=name)


def role_policy(aws) -> dict:
    document = aws("iam").get_role_policy(RoleName="kennel-endpoint", PolicyName="kennel-endpoint-execution")
    policy = document["PolicyDocument"]
    return json.loads(policy) if isinstance(policy, str) else policy


# ----------------------------------------------------------------------------- serverless


def test_deploy_serverless_then_unchanged(cli, moto, aws, trained):
    argv = ["deploy", "--serverless", "--memory-size", "4096", "--max-concurrency", "8",
            "--provisioned-concurrency", "2", *POLL]
    status, out, err = cli(*argv)
    assert status == 0, err
    (request,) = moto.sent("SageMaker.CreateEndpointConfig")
    (variant,) = request["ProductionVariants"]
    assert variant["ServerlessConfig"] == {"MemorySizeInMB": 4096, "MaxConcurrency": 8, "ProvisionedConcurrency": 2}
    # Serverless variants have no instances, weights or startup timeouts; the image is the same.
    assert not {"InstanceType", "InitialInstanceCount", "ContainerStartupHealthCheckTimeoutInSeconds"} & set(variant)
    assert "AsyncInferenceConfig" not in request
    assert aws("sagemaker").describe_endpoint(EndpointName="kennel")["EndpointStatus"] == "InService"

    moto.reset_recording()
    status, again, err = cli(*argv)
    assert (status, again) == (0, out), err
    assert moto.mutating() == []


def test_deploy_serverless_defaults_and_dry_run(cli, moto, aws, trained, planned):
    status, out, err = cli("deploy", "--serverless", "--dry-run")
    assert status == 0, err
    assert moto.mutating() == []
    plan = planned(out)
    assert [r["operation"] for r in plan] == ["CreateRole", "PutRolePolicy", "CreateModel", "CreateEndpointConfig",
                                              "CreateEndpoint"]
    assert plan[3]["params"]["ProductionVariants"][0]["ServerlessConfig"] == {"MemorySizeInMB": 2048,
                                                                              "MaxConcurrency": 5}
    assert aws("sagemaker").list_endpoints()["Endpoints"] == []


@pytest.mark.parametrize("argv, message", [
    (["--serverless", "--instance-type", "ml.c5.large"], "--instance-type cannot go with --serverless"),
    (["--serverless", "--subnets", "subnet-1", "--security-groups", "sg-1"], "--subnets cannot go with --serverless"),
    (["--serverless", "--output", ASYNC_ROOT], "--output cannot go with --serverless"),
    (["--serverless", "--max-concurrency", "2", "--provisioned-concurrency", "3"],
     "--provisioned-concurrency 3 is more than --max-concurrency 2"),
    (["--serverless", "--memory-size", "1500"], "1024 to 6144 in steps of 1024"),
    (["--serverless", "--max-concurrency", "201"], "between 1 and 200"),
    (["--serverless", "--async"], "not allowed with argument"),
    (["--memory-size", "2048"], "--memory-size cannot go with a real-time endpoint"),
    (["--async"], "--async needs --output s3://BUCKET/PREFIX/"),
    (["--async", "--output", "s3://kennel-data/a*/"], "as a pattern"),
    (["--async", "--output", ASYNC_ROOT, "--success-topic", "kennel-answers"], "is not an SNS topic ARN"),
    (["--async", "--output", ASYNC_ROOT, "--max-concurrency", "4"], "--max-concurrency cannot go with --async"),
])
def test_deploy_hosting_flags_refused_in_one_line(cli, moto, trained, argv, message):
    status, _, err = cli("deploy", *argv)
    assert status in (1, 2)
    assert err.count("\n") == 1 and message in err, err
    assert moto.mutating() == []


def test_deploy_refuses_to_change_the_kind_of_an_endpoint(cli, moto, deployed):
    for argv in (["--serverless"], ["--async", "--output", ASYNC_ROOT]):
        status, _, err = cli("deploy", *argv, *POLL)
        assert status == 1
        assert err.splitlines()[-1].startswith("error: endpoint kennel is real-time, and SageMaker cannot change an "
                                               "endpoint to ")
        assert moto.mutating() == []


def test_autoscale_refuses_a_serverless_endpoint(cli, moto, trained):
    assert cli("deploy", "--serverless", *POLL)[0] == 0
    moto.reset_recording()
    status, _, err = cli("autoscale")
    assert status == 1 and "is serverless: SageMaker scales it by itself" in err and err.count("\n") == 1
    assert moto.mutating() == []


# ----------------------------------------------------------------------------- async


def deploy_async(cli, *extra: str) -> tuple[str, str]:
    status, out, err = cli("deploy", "--async", "--output", ASYNC_ROOT, "--success-topic", SUCCESS_TOPIC,
                           "--error-topic", ERROR_TOPIC, "--max-concurrent-invocations", "2", *extra, *POLL)
    assert status == 0, err
    return out, err


def test_deploy_async_config_role_and_settings_then_unchanged(cli, moto, aws, trained):
    out, _ = deploy_async(cli)
    assert out.splitlines()[-1] == f"async {ASYNC_ROOT}"
    config = config_of(aws)
    assert config["AsyncInferenceConfig"] == {
        "OutputConfig": {"S3OutputPath": f"{ASYNC_ROOT}outputs/", "S3FailurePath": f"{ASYNC_ROOT}failures/",
                         "NotificationConfig": {"SuccessTopic": SUCCESS_TOPIC, "ErrorTopic": ERROR_TOPIC}},
        "ClientConfig": {"MaxConcurrentInvocationsPerInstance": 2}}
    assert config["ProductionVariants"][0]["InstanceType"] == "ml.m5.large"
    model = aws("sagemaker").describe_model(ModelName=config["ProductionVariants"][0]["ModelName"])
    from kennel_ops.aws.deploy import ASYNC_ENV
    assert model["PrimaryContainer"]["Environment"] == ASYNC_ENV
    # Least privilege: read the requests, write answers and failures, publish to the two topics.
    statements = {statement["Sid"]: statement for statement in role_policy(aws)["Statement"]}
    assert statements["ReadAsyncRequests"]["Action"] == "s3:GetObject"
    assert statements["ReadAsyncRequests"]["Resource"] == [f"arn:aws:s3:::{BUCKET}/async/inputs/*"]
    assert statements["WriteAsyncAnswers"]["Action"] == "s3:PutObject"
    assert statements["WriteAsyncAnswers"]["Resource"] == [f"arn:aws:s3:::{BUCKET}/async/failures/*",
                                                           f"arn:aws:s3:::{BUCKET}/async/outputs/*"]
    assert statements["NotifyAsyncAnswers"] == {"Sid": "NotifyAsyncAnswers", "Effect": "Allow",
                                                "Action": "sns:Publish", "Resource": [SUCCESS_TOPIC, ERROR_TOPIC]}
    assert statements["ReadTheModel"]["Resource"] == [
        f"arn:aws:s3:::{BUCKET}/kennel/models/kennel-t1/output/model.tar.gz"]

    moto.reset_recording()
    again, _ = deploy_async(cli)
    assert again == out
    assert moto.mutating() == []


def test_deploy_async_env_yields_to_the_users(cli, moto, aws, trained):
    deploy_async(cli, "--env", "SAGEMAKER_MAX_PAYLOAD_IN_MB=8")
    config = config_of(aws)
    model = aws("sagemaker").describe_model(ModelName=config["ProductionVariants"][0]["ModelName"])
    assert model["PrimaryContainer"]["Environment"]["SAGEMAKER_MAX_PAYLOAD_IN_MB"] == "8"


def test_deploy_async_dry_run_sends_nothing(cli, moto, aws, trained, planned):
    status, out, err = cli("deploy", "--async", "--output", ASYNC_ROOT, "--dry-run")
    assert status == 0, err
    assert moto.mutating() == []
    plan = planned(out)
    assert [r["operation"] for r in plan] == ["CreateRole", "PutRolePolicy", "CreateModel", "CreateEndpointConfig",
                                              "CreateEndpoint"]
    assert plan[3]["params"]["AsyncInferenceConfig"]["OutputConfig"] == {
        "S3OutputPath": f"{ASYNC_ROOT}outputs/", "S3FailurePath": f"{ASYNC_ROOT}failures/"}
    sids = [statement["Sid"] for statement in json.loads(plan[1]["params"]["PolicyDocument"])["Statement"]]
    assert "NotifyAsyncAnswers" not in sids and {"ReadAsyncRequests", "WriteAsyncAnswers"} <= set(sids)


@pytest.fixture
def async_endpoint(cli, moto, trained):
    deploy_async(cli)
    moto.reset_recording()


def scaling(aws) -> tuple[list, dict, list]:
    client = aws("application-autoscaling")
    targets = client.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    policies = {p["PolicyName"]: p for p in client.describe_scaling_policies(ServiceNamespace="sagemaker")[
        "ScalingPolicies"]}
    alarms = aws("cloudwatch").describe_alarms()["MetricAlarms"]
    return targets, policies, alarms


def test_autoscale_async_from_zero_on_the_backlog_then_unchanged(cli, moto, aws, async_endpoint):
    status, out, err = cli("autoscale", "--max", "3")
    assert status == 0, err
    assert out == f"autoscale {RESOURCE_ID} min 0 max 3 target 5 ApproximateBacklogSizePerInstance\n"
    targets, policies, alarms = scaling(aws)
    assert [(t["MinCapacity"], t["MaxCapacity"]) for t in targets] == [(0, 3)]
    assert sorted(policies) == ["kennel-backlog-per-instance", "kennel-scale-from-zero"]
    backlog = policies["kennel-backlog-per-instance"]["TargetTrackingScalingPolicyConfiguration"]
    assert backlog["TargetValue"] == 5.0
    assert backlog["CustomizedMetricSpecification"] == {
        "MetricName": "ApproximateBacklogSizePerInstance", "Namespace": "AWS/SageMaker", "Statistic": "Average",
        "Dimensions": [{"Name": "EndpointName", "Value": "kennel"}]}
    wake = policies["kennel-scale-from-zero"]
    assert wake["PolicyType"] == "StepScaling"
    assert wake["StepScalingPolicyConfiguration"]["StepAdjustments"] == [
        {"MetricIntervalLowerBound": 0.0, "ScalingAdjustment": 1}]
    (alarm,) = alarms
    assert (alarm["AlarmName"], alarm["MetricName"], alarm["Namespace"]) == (
        "kennel-has-backlog-without-capacity", "HasBacklogWithoutCapacity", "AWS/SageMaker")
    assert alarm["Dimensions"] == [{"Name": "EndpointName", "Value": "kennel"}]
    assert (alarm["Threshold"], alarm["ComparisonOperator"]) == (1.0, "GreaterThanOrEqualToThreshold")
    assert alarm["AlarmActions"] == [wake["PolicyARN"]]

    moto.reset_recording()
    status, again, err = cli("autoscale", "--max", "3")
    assert (status, again) == (0, out), err
    assert moto.mutating() == []

    status, _, err = cli("autoscale", "--remove")
    assert status == 0, err
    assert scaling(aws) == ([], {}, [])
    moto.reset_recording()
    assert cli("autoscale", "--remove")[0] == 0
    assert moto.mutating() == []


def test_autoscale_async_dry_run_and_refusals(cli, moto, aws, async_endpoint, planned, tmp_path):
    status, out, err = cli("autoscale", "--dry-run")
    assert status == 0, err
    assert moto.mutating() == [] and scaling(aws) == ([], {}, [])
    plan = planned(out)
    assert [r["operation"] for r in plan] == ["RegisterScalableTarget", "PutScalingPolicy", "PutScalingPolicy",
                                              "PutMetricAlarm"]
    assert plan[0]["params"]["MinCapacity"] == 0
    assert plan[3]["params"]["AlarmActions"] == ["<PolicyARN of kennel-scale-from-zero>"]
    report = tmp_path / "report.json"
    report.write_text('{"recommended_invocations_per_instance": 100}')
    status, _, err = cli("autoscale", "--from-report", str(report))
    assert status == 1 and "scales on its backlog: pass --target" in err
    status, _, err = cli("autoscale", "--min", "0", "--max", "0")
    assert status == 1 and "--max must be at least 1" in err
    assert moto.mutating() == []


def test_teardown_removes_the_async_scaling_and_alarm(cli, moto, aws, async_endpoint):
    assert cli("autoscale")[0] == 0
    status, out, err = cli("teardown", "--yes", "--poll-seconds", "0.01")
    assert status == 0, err
    for label in ("alarm kennel-has-backlog-without-capacity", "scaling policy kennel-scale-from-zero",
                  "scaling policy kennel-backlog-per-instance", "endpoint kennel"):
        assert f"deleted {label}" in out
    assert scaling(aws) == ([], {}, [])
    assert "an async endpoint's inputs/, outputs/ and failures/" in err


# ----------------------------------------------------------------------------- invoke-async


def queue_async_results(moto, *results: dict) -> None:
    requests.post(f"{moto.url}/moto-api/static/sagemaker/async-endpoint-results",
                  json={"results": list(results)}, timeout=10).raise_for_status()


def test_invoke_async_uploads_invokes_and_prints_the_answer_twice(cli, moto, aws, async_endpoint, tmp_path):
    body = tmp_path / "dogs.jsonl"
    body.write_text('{"image": "aGVsbG8="}\n{"image": "d29ybGQ="}\n')
    answers = ['[{"label": "001.Affenpinscher", "probability": 0.9}]\n',
               '[{"label": "002.Afghan_hound", "probability": 0.8}]\n']
    queue_async_results(moto, *({"data": answer} for answer in answers))
    for answer in answers:
        moto.reset_recording()
        status, out, err = cli("invoke-async", "--input", body, *POLL)
        assert status == 0, err
        assert out == answer
        (upload,) = [r for r in moto.requests() if r.operation.startswith("PUT /")]
        assert upload.path.startswith(f"/{BUCKET}/async/inputs/") and upload.path.endswith("/dogs.jsonl")
        (invoke,) = [r for r in moto.requests() if "async-invocations" in r.path]
        assert invoke.path == "/endpoints/kennel/async-invocations"
    listed = aws("s3").list_objects_v2(Bucket=BUCKET, Prefix="async/inputs/")["Contents"]
    assert len(listed) == 2 and {o["Size"] for o in listed} == {body.stat().st_size}


def test_invoke_async_reports_a_failed_request_in_one_line(cli, moto, async_endpoint, tmp_path):
    body = tmp_path / "rex.jpg"
    body.write_bytes(b"not really a jpeg")
    queue_async_results(moto, {"is_failure": True, "data": '{"error": "the image is not a JPEG\\nat all"}'})
    status, out, err = cli("invoke-async", "--input", body, *POLL)
    assert status == 1 and out == ""
    assert err.splitlines()[-1].startswith("error: request ") and 'is failed: {"error": "the image is not a JPEG' \
        in err.splitlines()[-1]


def test_invoke_async_dry_run_no_wait_and_refusals(cli, moto, aws, async_endpoint, planned, tmp_path):
    body = tmp_path / "dogs.jsonl"
    body.write_text('{"image": "aGVsbG8="}\n')
    status, out, err = cli("invoke-async", "--input", body, "--dry-run")
    assert status == 0, err
    assert moto.mutating() == []
    assert [r["operation"] for r in planned(out)] == ["PutObject", "InvokeEndpointAsync"]
    assert planned(out)[1]["params"]["ContentType"] == "application/jsonlines"
    assert "Contents" not in aws("s3").list_objects_v2(Bucket=BUCKET, Prefix="async/inputs/")

    status, out, err = cli("invoke-async", "--input", body, "--no-wait")
    assert status == 0, err
    assert out.startswith("output s3://")

    for argv, message in (([tmp_path / "missing.jsonl"], "no input file"),
                          ([tmp_path], "is not a file"),
                          ([tmp_path / "x.bin"], "cannot tell the content type of x.bin: pass --content-type")):
        (tmp_path / "x.bin").write_bytes(b"x")
        status, _, err = cli("invoke-async", "--input", *argv)
        assert status == 1 and message in err and err.count("\n") == 1, err


def test_invoke_async_refuses_a_real_time_endpoint(cli, moto, deployed, tmp_path):
    body = tmp_path / "rex.jpg"
    body.write_bytes(b"\xff\xd8")
    status, _, err = cli("invoke-async", "--input", body)
    assert status == 1 and "is not asynchronous: call it with InvokeEndpoint" in err
    assert moto.mutating() == []
