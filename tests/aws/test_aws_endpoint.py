"""deploy and autoscale against moto in server mode.

moto has no UpdateEndpoint (its server answers 500), so updating an existing
endpoint to a new config, the auto-scaled update (RetainAllVariantProperties)
and the rollback check are covered with botocore's Stubber; creating,
re-deploying unchanged and the whole of auto-scaling run on moto.
"""
from __future__ import annotations

import json

import boto3
import pytest
from botocore.stub import Stubber

from aws_testkit import ACCOUNT, BUCKET

pytestmark = pytest.mark.aws

SERVE_URI = f"{ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com/kennel-serve"
ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/kennel-sagemaker"
ENDPOINT_ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/kennel-endpoint"
MODEL_DATA = f"s3://{BUCKET}/kennel/models/kennel-t1/output/model.tar.gz"
RESOURCE_ID = "endpoint/kennel/variant/AllTraffic"
DIMENSION = "sagemaker:variant:DesiredInstanceCount"


def output_fields(out: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split()[1:] for line in out.splitlines()}


# ----------------------------------------------------------------------------- deploy


def test_deploy_creates_model_config_endpoint_then_changes_nothing(cli, moto, aws, trained):
    status, out, err = cli("deploy", "--env", "SAGEMAKER_MODEL_SERVER_WORKERS=2", "--poll-seconds", "0.01",
                           "--tags", "team=ml")
    assert status == 0, err
    assert "model from training job kennel-t1" in err
    fields = output_fields(out)
    sagemaker = aws("sagemaker")
    endpoint = sagemaker.describe_endpoint(EndpointName="kennel")
    assert endpoint["EndpointStatus"] == "InService"
    assert fields["endpoint"] == ["kennel", endpoint["EndpointArn"]]
    assert endpoint["EndpointConfigName"] == fields["config"][0]
    config = sagemaker.describe_endpoint_config(EndpointConfigName=fields["config"][0])
    assert config["ProductionVariants"] == [{
        "VariantName": "AllTraffic", "ModelName": fields["model"][0], "InstanceType": "ml.m5.large",
        "InitialInstanceCount": 1, "InitialVariantWeight": 1.0, "ContainerStartupHealthCheckTimeoutInSeconds": 600}]
    model = sagemaker.describe_model(ModelName=fields["model"][0])
    assert model["PrimaryContainer"]["Image"] == f"{SERVE_URI}:1.0.1-bbbbbbbbbbbb"
    assert model["PrimaryContainer"]["ModelDataUrl"] == MODEL_DATA
    assert model["PrimaryContainer"]["Environment"] == {"SAGEMAKER_MODEL_SERVER_WORKERS": "2"}
    assert model["ExecutionRoleArn"] == ENDPOINT_ROLE_ARN
    for arn in (endpoint["EndpointArn"], config["EndpointConfigArn"], model["ModelArn"]):
        tags = {t["Key"]: t["Value"] for t in sagemaker.list_tags(ResourceArn=arn)["Tags"]}
        assert tags == {"team": "ml", "kennel:deployment": "kennel"}

    moto.reset_recording()
    status, again, err = cli("deploy", "--env", "SAGEMAKER_MODEL_SERVER_WORKERS=2", "--poll-seconds", "0.01")
    assert (status, again) == (0, out), err
    assert "already on" in err
    assert moto.mutating() == []


def test_deploy_from_model_data_with_timeouts_and_instance_settings(cli, moto, aws, staged):
    status, out, err = cli("deploy", "--model-data", MODEL_DATA, "--instance-type", "ml.c5.large",
                           "--instance-count", "2", "--startup-timeout", "900", "--download-timeout", "300",
                           "--image", f"{SERVE_URI}:pinned", "--no-wait")
    assert status == 0, err
    (model,) = moto.sent("SageMaker.CreateModel")
    assert model["PrimaryContainer"] == {"Image": f"{SERVE_URI}:pinned", "ModelDataUrl": MODEL_DATA,
                                         "Mode": "SingleModel"}
    (config,) = moto.sent("SageMaker.CreateEndpointConfig")
    variant = config["ProductionVariants"][0]
    assert (variant["InstanceType"], variant["InitialInstanceCount"]) == ("ml.c5.large", 2)
    assert variant["ContainerStartupHealthCheckTimeoutInSeconds"] == 900
    assert variant["ModelDataDownloadTimeoutInSeconds"] == 300
    assert moto.mutating() == ["iam:CreateRole", "iam:PutRolePolicy", "SageMaker.CreateModel",
                               "SageMaker.CreateEndpointConfig", "SageMaker.CreateEndpoint"]


def test_deploy_dry_run_sends_nothing(cli, moto, aws, trained, planned):
    status, out, err = cli("deploy", "--dry-run")
    assert status == 0, err
    assert moto.mutating() == []
    assert [r["operation"] for r in planned(out)] == ["CreateRole", "PutRolePolicy", "CreateModel",
                                                      "CreateEndpointConfig", "CreateEndpoint"]
    sagemaker = aws("sagemaker")
    assert sagemaker.list_models()["Models"] == [] and sagemaker.list_endpoints()["Endpoints"] == []
    assert [role["RoleName"] for role in aws("iam").list_roles()["Roles"]] == ["kennel-sagemaker"]


@pytest.mark.parametrize("argv, message", [
    (["--model-data", "s3://kennel-data/models/"], "must name a model.tar.gz"),
    (["--training-job", "kennel-none"], "no training job kennel-none"),
    (["--startup-timeout", "30"], "between 60 and 3600 seconds"),
])
def test_deploy_refuses_bad_input_in_one_line(cli, moto, staged, argv, message):
    status, _, err = cli("deploy", *argv)
    assert status in (1, 2)
    assert err.count("\n") == 1 and message in err
    assert moto.mutating() == []


def test_deploy_without_completed_job_says_what_to_pass(cli, moto, staged):
    status, _, err = cli("deploy")
    assert status == 1
    assert err == "error: no completed training job named kennel-...: pass --model-data or --training-job\n"


def stubbed_clients(monkeypatch, services: list[str]) -> dict[str, tuple]:
    """Stubbed botocore clients that Aws.client hands out for these services."""
    from kennel_ops.aws.context import Aws
    session = boto3.Session(region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    clients = {service: session.client(service) for service in services}
    stubbers = {service: Stubber(client) for service, client in clients.items()}
    monkeypatch.setattr(Aws, "client", lambda self, service: clients[service])
    return stubbers


def endpoint_description(config: str, status: str) -> dict:
    return {"EndpointName": "kennel", "EndpointArn": f"arn:aws:sagemaker:us-east-1:{ACCOUNT}:endpoint/kennel",
            "EndpointConfigName": config, "EndpointStatus": status, "CreationTime": 0, "LastModifiedTime": 0}


def not_found(stubber: Stubber, operation: str, what: str) -> None:
    stubber.add_client_error(operation, "ValidationException", f'Could not find {what} "arn:..."', 400)


# What deploy sends for DEPLOY_UPDATE; names carry a digest of this content (kennel_ops.aws.names).
CONTAINER = {"Image": f"{SERVE_URI}:2", "ModelDataUrl": MODEL_DATA, "Mode": "SingleModel"}
MODEL_CONTENT = {"PrimaryContainer": CONTAINER, "ExecutionRoleArn": ROLE_ARN, "EnableNetworkIsolation": False}
DEPLOY_UPDATE = ["deploy", "--model-data", MODEL_DATA, "--image", f"{SERVE_URI}:2", "--role-arn", ROLE_ARN,
                 "--poll-seconds", "0.01", "--region", "us-east-1"]
TAGS = [{"Key": "kennel:deployment", "Value": "kennel"}]


def expected_names() -> tuple[str, str, list[dict]]:
    from kennel_ops.aws.names import Names
    model = Names("kennel").model(MODEL_CONTENT)
    variants = [{"VariantName": "AllTraffic", "ModelName": model, "InstanceType": "ml.m5.large",
                 "InitialInstanceCount": 1, "InitialVariantWeight": 1.0,
                 "ContainerStartupHealthCheckTimeoutInSeconds": 600}]
    return model, Names("kennel").endpoint_config(variants), variants


def stub_update(stubbers, *, scaled: bool, rolled_back: bool = False, current_type: str = "ml.m5.large") -> str:
    model, config, variants = expected_names()
    stub = stubbers["sagemaker"]
    stub.add_response("describe_endpoint", endpoint_description("kennel-0000000000", "InService"),
                      {"EndpointName": "kennel"})
    current_config = {"EndpointConfigName": "kennel-0000000000", "EndpointConfigArn": "arn:aws:sagemaker:::x",
                      "CreationTime": 0, "ProductionVariants": [{"VariantName": "AllTraffic",
                                                                 "InstanceType": current_type}]}
    # deploy first checks the endpoint stays real-time (SageMaker cannot change its kind in place)
    stub.add_response("describe_endpoint_config", current_config, {"EndpointConfigName": "kennel-0000000000"})
    not_found(stub, "describe_model", "model")
    stub.add_response("create_model", {"ModelArn": f"arn:aws:sagemaker:us-east-1:{ACCOUNT}:model/{model}"},
                      {"ModelName": model, **MODEL_CONTENT, "Tags": TAGS})
    not_found(stub, "describe_endpoint_config", "endpoint configuration")
    stub.add_response("create_endpoint_config", {"EndpointConfigArn": "arn:aws:sagemaker:::endpoint-config/x"},
                      {"EndpointConfigName": config, "ProductionVariants": variants, "Tags": TAGS})
    targets = [{"ServiceNamespace": "sagemaker", "ResourceId": RESOURCE_ID, "ScalableDimension": DIMENSION,
                "MinCapacity": 1, "MaxCapacity": 4, "RoleARN": "arn:aws:iam::1:role/x", "CreationTime": 0}]
    stubbers["application-autoscaling"].add_response(
        "describe_scalable_targets", {"ScalableTargets": targets if scaled else []},
        {"ServiceNamespace": "sagemaker", "ResourceIds": [RESOURCE_ID], "ScalableDimension": DIMENSION})
    if scaled:
        stub.add_response("describe_endpoint_config", current_config, {"EndpointConfigName": "kennel-0000000000"})
    if current_type == "ml.m5.large":
        stub.add_response("update_endpoint", {"EndpointArn": "arn:aws:sagemaker:::endpoint/kennel"},
                          {"EndpointName": "kennel", "EndpointConfigName": config,
                           "RetainAllVariantProperties": scaled})
        stub.add_response("describe_endpoint", endpoint_description("kennel-0000000000", "Updating"))
        stub.add_response("describe_endpoint",
                          endpoint_description("kennel-0000000000" if rolled_back else config, "InService"))
    if current_type == "ml.m5.large":  # the endpoint's ARN in the output names the account
        stubbers["sts"].add_response("get_caller_identity", {"Account": ACCOUNT, "Arn": "arn:aws:iam::1:user/x",
                                                             "UserId": "x"})
    for stubber in stubbers.values():
        stubber.activate()
    return config


@pytest.mark.parametrize("scaled", [False, True])
def test_deploy_updates_an_existing_endpoint_with_a_new_config(cli, monkeypatch, scaled):
    """UpdateEndpoint (not in moto): a new model + config, then the update, then InService on the new config."""
    stubbers = stubbed_clients(monkeypatch, ["sagemaker", "application-autoscaling", "sts"])
    config = stub_update(stubbers, scaled=scaled)
    status, out, err = cli(*DEPLOY_UPDATE)
    assert status == 0, err
    for stubber in stubbers.values():
        stubber.assert_no_pending_responses()
    assert f"updating from kennel-0000000000 to {config}" in err
    assert ("keeping the auto-scaled instance count" in err) is scaled
    assert "endpoint kennel: Updating" in err and "endpoint kennel: InService" in err
    assert output_fields(out)["config"] == [config]


def test_deploy_reports_a_rolled_back_update(cli, monkeypatch):
    stubbers = stubbed_clients(monkeypatch, ["sagemaker", "application-autoscaling", "sts"])
    stub_update(stubbers, scaled=False, rolled_back=True)
    status, _, err = cli(*DEPLOY_UPDATE)
    assert status == 1
    assert err.splitlines()[-1] == ("error: endpoint kennel rolled back to kennel-0000000000: "
                                    "the new variant did not become healthy")


def test_deploy_refuses_instance_type_change_of_an_autoscaled_variant(cli, monkeypatch):
    stubbers = stubbed_clients(monkeypatch, ["sagemaker", "application-autoscaling", "sts"])
    stub_update(stubbers, scaled=True, current_type="ml.c5.large")
    status, _, err = cli(*DEPLOY_UPDATE)
    assert status == 1
    assert err.splitlines()[-1] == ("error: the endpoint is auto-scaled on ml.c5.large: to move to ml.m5.large, run "
                                    "`kennel-aws autoscale --remove`, deploy, then `kennel-aws autoscale` again")
    for stubber in stubbers.values():
        stubber.assert_no_pending_responses()  # and no UpdateEndpoint was queued or sent


# ----------------------------------------------------------------------------- autoscale


def scaling_state(aws) -> tuple[list, list]:
    scaling = aws("application-autoscaling")
    targets = scaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    policies = scaling.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]
    return targets, policies


def test_autoscale_original_values_then_unchanged(cli, moto, aws, deployed):
    status, out, err = cli("autoscale")
    assert status == 0, err
    assert out == f"autoscale {RESOURCE_ID} min 1 max 4 target 250 SageMakerVariantInvocationsPerInstance\n"
    targets, policies = scaling_state(aws)
    assert [(t["ResourceId"], t["ScalableDimension"], t["MinCapacity"], t["MaxCapacity"]) for t in targets] == [
        (RESOURCE_ID, DIMENSION, 1, 4)]
    (policy,) = policies
    assert (policy["PolicyName"], policy["PolicyType"], policy["ResourceId"]) == (
        "kennel-invocations-per-instance", "TargetTrackingScaling", RESOURCE_ID)
    configuration = policy["TargetTrackingScalingPolicyConfiguration"]
    assert configuration["TargetValue"] == 250.0
    assert configuration["PredefinedMetricSpecification"] == {
        "PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"}
    assert (configuration["ScaleInCooldown"], configuration["ScaleOutCooldown"]) == (300, 300)

    moto.reset_recording()
    status, again, err = cli("autoscale")
    assert (status, again) == (0, out), err
    assert moto.mutating() == []

    status, _, err = cli("autoscale", "--target", "320", "--max", "6")
    assert status == 0, err
    assert moto.mutating() == ["AnyScaleFrontendService.RegisterScalableTarget",
                               "AnyScaleFrontendService.PutScalingPolicy"]
    targets, policies = scaling_state(aws)
    assert targets[0]["MaxCapacity"] == 6
    assert policies[0]["TargetTrackingScalingPolicyConfiguration"]["TargetValue"] == 320.0


def test_autoscale_takes_the_target_from_a_load_test_report(cli, moto, aws, deployed, tmp_path):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"recommended_invocations_per_instance": 187.5, "p99_ms": 412}))
    status, out, err = cli("autoscale", "--from-report", str(report))
    assert status == 0, err
    assert "target 187.5" in out
    _, policies = scaling_state(aws)
    assert policies[0]["TargetTrackingScalingPolicyConfiguration"]["TargetValue"] == 187.5


@pytest.mark.parametrize("content, message", [
    ("{}", "recommended_invocations_per_instance must be a positive number, got None"),
    ('{"recommended_invocations_per_instance": -3}', "must be a positive number, got -3"),
    ("not json", "is not JSON"),
])
def test_autoscale_bad_report_is_one_line(cli, moto, aws, deployed, tmp_path, content, message):
    report = tmp_path / "report.json"
    report.write_text(content)
    status, _, err = cli("autoscale", "--from-report", str(report))
    assert status == 1 and err.count("\n") == 1 and message in err
    assert moto.mutating() == []


def test_autoscale_remove_then_nothing_left(cli, moto, aws, deployed):
    assert cli("autoscale")[0] == 0
    status, _, err = cli("autoscale", "--remove")
    assert status == 0, err
    assert scaling_state(aws) == ([], [])
    moto.reset_recording()
    assert cli("autoscale", "--remove")[0] == 0
    assert moto.mutating() == []


def test_autoscale_dry_run_and_missing_endpoint(cli, moto, aws, deployed, planned):
    status, out, err = cli("autoscale", "--dry-run")
    assert status == 0, err
    assert [r["operation"] for r in planned(out)] == ["RegisterScalableTarget", "PutScalingPolicy"]
    assert moto.mutating() == [] and scaling_state(aws) == ([], [])
    status, _, err = cli("autoscale", "--name", "nosuch")
    assert status == 1 and err == "error: no endpoint nosuch: run `kennel-aws deploy` first\n"
    status, _, err = cli("autoscale", "--min", "3", "--max", "2")
    assert status == 1 and err == "error: need 1 <= --min (3) <= --max (2)\n"
