"""teardown against moto in server mode, after every other command has run.

Provisioned concurrency goes through the same Stubber route as in
test_aws_lambda (moto has no such API); everything else is moto's state.
"""
from __future__ import annotations

import io

import pytest

from aws_testkit import KEY, pc_absent, pc_put, pc_state

pytestmark = pytest.mark.aws

EVERYTHING = ["scaling policy kennel-invocations-per-instance", "scalable target endpoint/kennel/variant/AllTraffic",
              "provisioned concurrency kennel-classify:live", "lambda alias kennel-classify:live",
              "lambda function kennel-classify", "endpoint kennel"]


@pytest.fixture
def stack(cli, moto, deployed, provisioned):
    """The whole deployment: endpoint (with its model and config), auto-scaling, Lambda with provisioned concurrency."""
    assert cli("autoscale")[0] == 0
    pc_absent(provisioned)
    pc_put(provisioned, 2)
    pc_state(provisioned, "READY", 2, 2)
    status, _, err = cli("lambda", "--poll-seconds", "0.01")
    assert status == 0, err
    moto.reset_recording()


def sagemaker_names(aws) -> dict[str, list[str]]:
    sagemaker = aws("sagemaker")
    return {"endpoints": [e["EndpointName"] for e in sagemaker.list_endpoints()["Endpoints"]],
            "configs": [c["EndpointConfigName"] for c in sagemaker.list_endpoint_configs()["EndpointConfigs"]],
            "models": [m["ModelName"] for m in sagemaker.list_models()["Models"]]}


def test_teardown_deletes_everything_then_finds_nothing(cli, moto, aws, stack, provisioned, monkeypatch):
    before = sagemaker_names(aws)
    assert before["endpoints"] == ["kennel"] and len(before["configs"]) == 1 and len(before["models"]) == 1
    pc_state(provisioned, "READY", 2, 2)
    provisioned.add_response("delete_provisioned_concurrency_config", {}, KEY)
    status, out, err = cli("teardown", "--yes", "--poll-seconds", "0.01")
    assert status == 0, err
    assert out.splitlines() == [f"deleted {label}" for label in [
        *EVERYTHING, f"endpoint config {before['configs'][0]}", f"model {before['models'][0]}",
        "iam role kennel-lambda", "iam role kennel-endpoint", "iam role kennel-sagemaker"]]
    assert sagemaker_names(aws) == {"endpoints": [], "configs": [], "models": []}
    scaling = aws("application-autoscaling")
    assert scaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"] == []
    assert scaling.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"] == []
    assert aws("lambda").list_functions()["Functions"] == []
    assert aws("iam").list_roles()["Roles"] == []
    assert {r["repositoryName"] for r in aws("ecr").describe_repositories()["repositories"]} == {
        "kennel-train", "kennel-serve"}  # kept without --delete-images
    assert "left: ECR repositories kennel-train, kennel-serve (--delete-images)" in err

    moto.reset_recording()
    status, out, err = cli("teardown", "--yes")
    assert (status, out) == (0, "nothing to delete for deployment kennel\n"), err
    assert "absent: endpoint kennel" in err and "absent: iam role kennel-lambda" in err
    assert "absent: iam role kennel-endpoint" in err
    assert moto.mutating() == []


def test_teardown_asks_and_a_non_interactive_stdin_deletes_nothing(cli, moto, aws, stack, provisioned, monkeypatch):
    pc_state(provisioned, "READY", 2, 2)
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))  # not a terminal: never read as consent
    status, out, err = cli("teardown")
    assert status == 1
    assert err.splitlines()[-1] == "error: 11 resources to delete; not asking on a non-interactive stdin: pass --yes"
    assert "  endpoint kennel" in err
    assert moto.mutating() == []
    assert sagemaker_names(aws)["endpoints"] == ["kennel"]


def test_teardown_dry_run_prints_the_deletions_and_sends_none(cli, moto, aws, stack, provisioned, planned):
    pc_state(provisioned, "READY", 2, 2)
    status, out, err = cli("teardown", "--dry-run", "--delete-images")
    assert status == 0, err
    assert moto.mutating() == []
    operations = [r["operation"] for r in planned(out)]
    assert operations == ["DeleteScalingPolicy", "DeregisterScalableTarget", "DeleteProvisionedConcurrencyConfig",
                          "DeleteAlias", "DeleteFunction", "DeleteEndpoint", "DeleteEndpointConfig", "DeleteModel",
                          "DeleteRolePolicy", "DeleteRole", "DeleteRolePolicy", "DeleteRole", "DeleteRolePolicy",
                          "DeleteRole",
                          "DeleteRepository", "DeleteRepository"]
    assert sagemaker_names(aws)["endpoints"] == ["kennel"]
    assert len(aws("iam").list_roles()["Roles"]) == 3


def test_teardown_leaves_other_deployments_alone(cli, moto, aws, stack, provisioned):
    status, _, err = cli("deploy", "--name", "kennel-b", "--training-job", "kennel-t1", "--role-arn",
                         "arn:aws:iam::123456789012:role/kennel-sagemaker", "--image",
                         "123456789012.dkr.ecr.us-east-1.amazonaws.com/kennel-serve:x", "--poll-seconds", "0.01")
    assert status == 0, err
    other = sagemaker_names(aws)
    pc_state(provisioned, "READY", 2, 2)
    provisioned.add_response("delete_provisioned_concurrency_config", {}, KEY)
    status, _, err = cli("teardown", "--yes", "--poll-seconds", "0.01", "--keep-roles")
    assert status == 0, err
    remaining = sagemaker_names(aws)
    assert remaining["endpoints"] == ["kennel-b"]
    assert len(remaining["configs"]) == 1 and remaining["configs"][0].startswith("kennel-b-")
    assert len(remaining["models"]) == 1 and remaining["models"][0].startswith("kennel-b-")
    assert set(remaining["configs"]) < set(other["configs"])
    assert len(aws("iam").list_roles()["Roles"]) == 3  # --keep-roles


def test_teardown_carries_on_past_a_failed_deletion(cli, moto, aws, stack, provisioned):
    pc_state(provisioned, "READY", 2, 2)
    provisioned.add_client_error("delete_provisioned_concurrency_config", "ResourceConflictException",
                                 "The operation cannot be performed at this time.", 409, expected_params=KEY)
    status, out, err = cli("teardown", "--yes", "--poll-seconds", "0.01")
    assert status == 1
    assert err.splitlines()[-1] == "error: teardown left 1 resources: provisioned concurrency kennel-classify:live"
    assert "could not delete provisioned concurrency kennel-classify:live: ResourceConflictException" in err
    assert "deleted endpoint kennel" in out and "deleted iam role kennel-lambda" in out
    assert sagemaker_names(aws)["endpoints"] == []
