"""lambda against moto in server mode (IAM, Lambda), provisioned concurrency through Stubber.

moto has no provisioned-concurrency API (its server answers 404 for
Get/Put/DeleteProvisionedConcurrencyConfig). Those three operations are routed
to a Stubber-backed Lambda client that checks each request against the Lambda
service model and answers what Lambda documents (not found, IN_PROGRESS,
READY); every other request goes to moto. Functions are created, never invoked.
"""
from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import boto3
import pytest
from botocore.stub import Stubber

from aws_testkit import ACCOUNT, FUNCTION, KEY, REGION, pc_absent, pc_put, pc_state

pytestmark = pytest.mark.aws

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def package(tmp_path) -> Path:
    from kennel_ops import build_lambda_zip
    return build_lambda_zip.build(tmp_path / "lambda.zip")


def expected_policy() -> dict:
    """lambda/policy.json with this account, region, endpoint and function written in by hand."""
    text = (REPO / "lambda" / "policy.json").read_text()
    for placeholder, value in {"PARTITION": "aws", "REGION": REGION, "ACCOUNT_ID": ACCOUNT,
                               "ENDPOINT_NAME": "kennel", "FUNCTION_NAME": FUNCTION}.items():
        text = text.replace("{{" + placeholder + "}}", value)
    assert "{{" not in text
    return json.loads(text)


def sha256_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def test_lambda_role_function_version_alias_and_provisioned_concurrency(cli, moto, aws, provisioned, package):
    pc_absent(provisioned)
    pc_put(provisioned, 2)
    pc_state(provisioned, "IN_PROGRESS", 2, 0)
    pc_state(provisioned, "READY", 2, 2)
    argv = ["lambda", "--zip", str(package), "--poll-seconds", "0.01", "--tags", "team=ml"]
    status, out, err = cli(*argv)
    assert status == 0, err
    assert "endpoint kennel does not exist yet" in err
    assert f"provisioned concurrency on {FUNCTION}:live: IN_PROGRESS (0/2 available)" in err
    assert f"provisioned concurrency on {FUNCTION}:live: READY (2/2 available)" in err

    iam = aws("iam")
    role = iam.get_role(RoleName="kennel-lambda")["Role"]
    assert role["AssumeRolePolicyDocument"] == json.loads((REPO / "lambda" / "trust-policy.json").read_text())
    assert iam.list_role_policies(RoleName="kennel-lambda")["PolicyNames"] == ["invoke-endpoint"]
    assert iam.list_attached_role_policies(RoleName="kennel-lambda")["AttachedPolicies"] == []
    policy = iam.get_role_policy(RoleName="kennel-lambda", PolicyName="invoke-endpoint")["PolicyDocument"]
    assert policy == expected_policy()
    assert policy["Statement"][0]["Resource"] == f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:endpoint/kennel"

    lam = aws("lambda")
    function = lam.get_function(FunctionName=FUNCTION)
    configuration = function["Configuration"]
    assert configuration["Role"] == role["Arn"]
    assert (configuration["Runtime"], configuration["Handler"]) == ("python3.12", "kennel_lambda.handler")
    assert (configuration["Timeout"], configuration["MemorySize"]) == (30, 256)
    assert configuration["Architectures"] == ["arm64"]
    assert configuration["Environment"]["Variables"] == {"ENDPOINT_NAME": "kennel"}
    assert configuration["CodeSha256"] == sha256_b64(package.read_bytes())
    assert function["Tags"] == {"team": "ml", "kennel:deployment": "kennel"}
    alias = lam.get_alias(FunctionName=FUNCTION, Name="live")
    assert alias["FunctionVersion"] == "1"
    assert [v["Version"] for v in lam.list_versions_by_function(FunctionName=FUNCTION)["Versions"]] == ["$LATEST", "1"]
    assert lam.get_function_concurrency(FunctionName=FUNCTION).get("ReservedConcurrentExecutions") is None
    assert out.splitlines() == [f"function arn:aws:lambda:{REGION}:{ACCOUNT}:function:{FUNCTION}:live",
                                f"role {role['Arn']}"]

    # Again: nothing changes, nothing is sent to moto; provisioned concurrency is only read.
    pc_state(provisioned, "READY", 2, 2)
    pc_state(provisioned, "READY", 2, 2)
    moto.reset_recording()
    status, again, err = cli(*argv)
    assert (status, again) == (0, out), err
    assert moto.mutating() == []
    assert "function kennel-classify: unchanged" in err and "alias live: unchanged (1)" in err


def test_lambda_new_code_moves_the_alias_and_concurrency_settings_change(
        cli, moto, aws, provisioned, package, tmp_path):
    pc_absent(provisioned)
    status, _, err = cli("lambda", "--zip", str(package), "--provisioned-concurrency", "0")
    assert status == 0, err

    changed = tmp_path / "changed.zip"
    changed.write_bytes(package.read_bytes() + b"\0")  # other bytes: another CodeSha256
    pc_absent(provisioned)
    pc_put(provisioned, 3)
    pc_state(provisioned, "READY", 3, 3)
    moto.reset_recording()
    status, _, err = cli("lambda", "--zip", str(changed), "--provisioned-concurrency", "3", "--reserved-concurrency",
                         "10", "--memory", "512", "--poll-seconds", "0.01")
    assert status == 0, err
    lam = aws("lambda")
    assert lam.get_alias(FunctionName=FUNCTION, Name="live")["FunctionVersion"] == "2"
    version = lam.get_function_configuration(FunctionName=FUNCTION, Qualifier="2")
    assert version["CodeSha256"] == sha256_b64(changed.read_bytes()) and version["MemorySize"] == 512
    assert lam.get_function_concurrency(FunctionName=FUNCTION)["ReservedConcurrentExecutions"] == 10
    operations = moto.mutating()
    assert [op.split(" ")[0] for op in operations] == ["PUT", "PUT", "POST", "PUT", "PUT"]  # code, config, publish,
    assert [op.rsplit("/", 1)[-1] for op in operations] == ["code", "configuration", "versions", "live", "concurrency"]

    # Back to no provisioned and no reserved concurrency.
    pc_state(provisioned, "READY", 3, 3)
    provisioned.add_response("delete_provisioned_concurrency_config", {}, KEY)
    status, _, err = cli("lambda", "--zip", str(changed), "--provisioned-concurrency", "0", "--memory", "512")
    assert status == 0, err
    assert "provisioned concurrency on live: removed" in err and "reserved concurrency: removed" in err
    assert lam.get_function_concurrency(FunctionName=FUNCTION).get("ReservedConcurrentExecutions") is None


def test_lambda_builds_the_package_from_lambda_sources_by_default(cli, moto, aws, provisioned):
    pc_absent(provisioned)
    status, _, err = cli("lambda", "--provisioned-concurrency", "0")
    assert status == 0, err
    built = (REPO / "build" / "lambda.zip").read_bytes()
    assert aws("lambda").get_function(FunctionName=FUNCTION)["Configuration"]["CodeSha256"] == sha256_b64(built)


def test_lambda_in_front_of_a_multi_model_endpoint_gets_a_default_target_model(cli, moto, aws, provisioned, package):
    import kennel_lambda
    pc_absent(provisioned)
    argv = ["lambda", "--zip", str(package), "--provisioned-concurrency", "0"]
    status, _, err = cli(*argv, "--target-model", "rex.tar.gz")
    assert status == 0, err
    variables = aws("lambda").get_function(FunctionName=FUNCTION)["Configuration"]["Environment"]["Variables"]
    assert variables == {"ENDPOINT_NAME": "kennel", kennel_lambda.TARGET_MODEL_ENV: "rex.tar.gz"}
    # Without the flag the default goes: callers name the model themselves.
    pc_absent(provisioned)
    status, _, err = cli(*argv)
    assert status == 0, err
    assert "function kennel-classify: configuration updated" in err
    variables = aws("lambda").get_function(FunctionName=FUNCTION)["Configuration"]["Environment"]["Variables"]
    assert variables == {"ENDPOINT_NAME": "kennel"}
    status, _, err = cli(*argv, "--target-model", "models/rex.tar.gz")
    assert status == 2 and "invalid target model 'models/rex.tar.gz'" in err and err.count("\n") == 1


def test_lambda_dry_run_sends_nothing(cli, moto, aws, provisioned, package, planned):
    pc_absent(provisioned)
    status, out, err = cli("lambda", "--zip", str(package), "--dry-run")
    assert status == 0, err
    assert moto.mutating() == []
    requests = planned(out)
    assert [r["operation"] for r in requests] == ["CreateRole", "PutRolePolicy", "CreateFunction", "PublishVersion",
                                                  "CreateAlias", "PutProvisionedConcurrencyConfig"]
    assert json.loads(requests[1]["params"]["PolicyDocument"]) == expected_policy()
    size = len(package.read_bytes())
    assert requests[2]["params"]["Code"]["ZipFile"].startswith(f"<{size} bytes, sha256 ")
    assert aws("iam").list_roles()["Roles"] == [] and aws("lambda").list_functions()["Functions"] == []


def test_lambda_refuses_provisioned_above_reserved(cli, moto):
    status, _, err = cli("lambda", "--provisioned-concurrency", "5", "--reserved-concurrency", "2")
    assert status == 1
    assert err == "error: --provisioned-concurrency (5) cannot exceed --reserved-concurrency (2)\n"
    assert moto.mutating() == []


def test_create_function_waits_out_iam_propagation():
    """A brand-new role is refused by Lambda for a few seconds: the call is retried with back-off."""
    from kennel_ops.aws.context import Aws, Console
    from kennel_ops.aws.iam import retry_while_propagating
    from kennel_ops.aws.function import role_not_ready
    import io
    client = boto3.Session(region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x").client("lambda")
    stubber = Stubber(client)
    for _ in range(2):
        stubber.add_client_error("create_function", "InvalidParameterValueException",
                                 "The role defined for the function cannot be assumed by Lambda.", 400)
    stubber.add_response("create_function", {"FunctionName": FUNCTION})
    stubber.activate()
    sleeps: list[float] = []
    notes = io.StringIO()
    aws = Aws(region=REGION, console=Console(io.StringIO(), notes))
    request = {"FunctionName": FUNCTION, "Role": f"arn:aws:iam::{ACCOUNT}:role/kennel-lambda",
               "Code": {"ZipFile": b"z"}}
    response = retry_while_propagating(lambda: client.create_function(**request), aws=aws, what="function",
                                       is_propagation_error=role_not_ready, sleep=sleeps.append)
    assert response["FunctionName"] == FUNCTION
    assert sleeps == [2.0, 4.0]
    assert notes.getvalue().count("IAM propagation") == 2
    stubber.assert_no_pending_responses()
