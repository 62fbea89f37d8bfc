"""The endpoint's execution role NAME-endpoint, against moto in server mode.

moto has no UpdateEndpoint (its server answers 500). Where a test deploys a
second artifact onto a live endpoint, the SageMaker client's update_endpoint
is replaced by one that re-creates the endpoint on the new config in moto (what
a successful update ends in) or leaves it on the old one (what a rolled-back
update ends in); every other request goes to moto.
"""
from __future__ import annotations

import io
import json
from urllib.parse import parse_qs

import boto3
import pytest
from botocore.exceptions import ClientError
from botocore.stub import Stubber

from aws_testkit import ACCOUNT, BUCKET, REGION

pytestmark = pytest.mark.aws

ROLE = "kennel-endpoint"
POLICY = "kennel-endpoint-execution"
ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/{ROLE}"
TRAINING_ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/kennel-sagemaker"
SERVE_URI = f"{ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com/kennel-serve"
SERVE_REPOSITORY_ARN = f"arn:aws:ecr:us-east-1:{ACCOUNT}:repository/kennel-serve"
TRAINED = f"s3://{BUCKET}/kennel/models/kennel-t1/output/model.tar.gz"
MODEL_A = f"s3://{BUCKET}/kennel/models/a/output/model.tar.gz"
MODEL_B = f"s3://{BUCKET}/kennel/models/b/output/model.tar.gz"
LOG_GROUP = f"arn:aws:logs:us-east-1:{ACCOUNT}:log-group:/aws/sagemaker/Endpoints/*"


def object_arn(s3_uri: str) -> str:
    return "arn:aws:s3:::" + s3_uri[len("s3://"):]


def expected_policy(*artifacts: str, vpc: bool = False) -> dict:
    """The whole inline policy, written out: reading exactly these objects is its only S3 permission."""
    from kennel_ops.aws.role import VPC_ACTIONS
    statements = [
        {"Sid": "ReadTheModel", "Effect": "Allow", "Action": "s3:GetObject",
         "Resource": sorted(object_arn(artifact) for artifact in artifacts)},
        {"Sid": "PullTheServingImage", "Effect": "Allow",
         "Action": ["ecr:BatchCheckLayerAvailability", "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"],
         "Resource": [SERVE_REPOSITORY_ARN]},
        {"Sid": "EcrLogin", "Effect": "Allow", "Action": "ecr:GetAuthorizationToken", "Resource": "*"},
        {"Sid": "WriteLogs", "Effect": "Allow",
         "Action": ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:DescribeLogStreams", "logs:PutLogEvents"],
         "Resource": [LOG_GROUP, f"{LOG_GROUP}:log-stream:*"]},
        {"Sid": "PublishMetrics", "Effect": "Allow", "Action": "cloudwatch:PutMetricData", "Resource": "*",
         "Condition": {"StringEquals": {"cloudwatch:namespace": "/aws/sagemaker/Endpoints"}}},
    ]
    if vpc:
        statements.append({"Sid": "RunInTheVpc", "Effect": "Allow", "Action": VPC_ACTIONS, "Resource": "*"})
    return {"Version": "2012-10-17", "Statement": statements}


def role_policy(aws) -> dict:
    return aws("iam").get_role_policy(RoleName=ROLE, PolicyName=POLICY)["PolicyDocument"]


def actions(policy: dict) -> set[str]:
    found = set()
    for statement in policy["Statement"]:
        found |= {statement["Action"]} if isinstance(statement["Action"], str) else set(statement["Action"])
    return found


def policies_sent(moto) -> list[dict]:
    """The documents of the PutRolePolicy requests moto received for NAME-endpoint, in order."""
    sent = []
    for request in moto.requests():
        if request.operation == "iam:PutRolePolicy":
            form = parse_qs(request.body)
            if form["RoleName"] == [ROLE]:
                sent.append(json.loads(form["PolicyDocument"][0]))
    return sent


def serving_model(aws) -> dict:
    sagemaker = aws("sagemaker")
    config = sagemaker.describe_endpoint_config(
        EndpointConfigName=sagemaker.describe_endpoint(EndpointName="kennel")["EndpointConfigName"])
    return sagemaker.describe_model(ModelName=config["ProductionVariants"][0]["ModelName"])


class UpdatingSageMaker:
    """moto's SageMaker client plus an update_endpoint that ends as a real update (or a rollback) would."""

    def __init__(self, real, roll_back: bool, updated: list[str]) -> None:
        self._real, self._roll_back, self._updated = real, roll_back, updated

    def update_endpoint(self, *, EndpointName: str, EndpointConfigName: str, RetainAllVariantProperties: bool):
        self._updated.append(EndpointConfigName)
        if not self._roll_back:
            self._real.delete_endpoint(EndpointName=EndpointName)
            self._real.create_endpoint(EndpointName=EndpointName, EndpointConfigName=EndpointConfigName)
        return {"EndpointArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:endpoint/{EndpointName.lower()}"}

    def __getattr__(self, name: str):
        return getattr(self._real, name)


@pytest.fixture
def updates(monkeypatch):
    """install(roll_back=...) routes update_endpoint as above; returns the configs updated to, in order."""
    from kennel_ops.aws.context import Aws
    real_client = Aws.client

    def install(roll_back: bool = False) -> list[str]:
        updated: list[str] = []

        def client(self, service):
            real = real_client(self, service)
            return UpdatingSageMaker(real, roll_back, updated) if service == "sagemaker" else real

        monkeypatch.setattr(Aws, "client", client)
        return updated

    return install


def deploy(cli, *argv: str) -> tuple[int, str, str]:
    return cli("deploy", "--poll-seconds", "0.01", *argv)


# ----------------------------------------------------------------------------- creating, re-running


def test_deploy_runs_the_model_with_a_role_that_reads_only_its_artifact(cli, moto, aws, trained):
    status, out, err = deploy(cli, "--tags", "team=ml")
    assert status == 0, err
    iam = aws("iam")
    role = iam.get_role(RoleName=ROLE)["Role"]
    assert role["Arn"] == ROLE_ARN
    assert role["AssumeRolePolicyDocument"]["Statement"] == [{
        "Sid": "SageMakerOnlyForThisAccount", "Effect": "Allow", "Principal": {"Service": "sagemaker.amazonaws.com"},
        "Action": "sts:AssumeRole", "Condition": {"StringEquals": {"aws:SourceAccount": ACCOUNT}}}]
    assert {t["Key"]: t["Value"] for t in role["Tags"]} == {"team": "ml", "kennel:deployment": "kennel"}
    assert iam.list_role_policies(RoleName=ROLE)["PolicyNames"] == [POLICY]
    assert iam.list_attached_role_policies(RoleName=ROLE)["AttachedPolicies"] == []
    policy = role_policy(aws)
    assert policy == expected_policy(TRAINED)
    assert {action for action in actions(policy) if action.startswith("s3:")} == {"s3:GetObject"}
    assert serving_model(aws)["ExecutionRoleArn"] == ROLE_ARN
    assert serving_model(aws)["PrimaryContainer"]["ModelDataUrl"] == TRAINED
    assert moto.mutating()[:2] == ["iam:CreateRole", "iam:PutRolePolicy"]
    assert "role kennel-endpoint: created" in err

    moto.reset_recording()
    status, again, err = deploy(cli)
    assert (status, again) == (0, out), err
    assert "role kennel-endpoint: unchanged" in err
    assert moto.mutating() == []


def test_deploy_does_not_need_the_training_role(cli, moto, aws, staged):
    aws("iam").delete_role_policy(RoleName="kennel-sagemaker", PolicyName="kennel-sagemaker-execution")
    aws("iam").delete_role(RoleName="kennel-sagemaker")
    status, _, err = deploy(cli, "--model-data", MODEL_A)
    assert status == 0, err
    assert role_policy(aws) == expected_policy(MODEL_A)


def test_a_new_artifact_moves_the_policy_to_it(cli, moto, aws, staged, updates):
    assert deploy(cli, "--model-data", MODEL_A)[0] == 0
    updated = updates()
    moto.reset_recording()
    status, out, err = deploy(cli, "--model-data", MODEL_B)
    assert status == 0, err
    assert len(updated) == 1 and updated[0] in out
    # While the update rolls out, instances of the old variant may still start: both are readable; then only B.
    assert policies_sent(moto) == [expected_policy(MODEL_A, MODEL_B), expected_policy(MODEL_B)]
    assert role_policy(aws) == expected_policy(MODEL_B)
    model = serving_model(aws)
    assert (model["ExecutionRoleArn"], model["PrimaryContainer"]["ModelDataUrl"]) == (ROLE_ARN, MODEL_B)

    moto.reset_recording()
    status, again, err = deploy(cli, "--model-data", MODEL_B)
    assert (status, again) == (0, out), err
    assert moto.mutating() == [] and len(updated) == 1


def test_a_rolled_back_update_leaves_only_the_serving_artifact_readable(cli, moto, aws, staged, updates):
    assert deploy(cli, "--model-data", MODEL_A)[0] == 0
    updates(roll_back=True)
    status, _, err = deploy(cli, "--model-data", MODEL_B)
    assert status == 1
    assert "error: endpoint kennel rolled back to" in err.splitlines()[-1]
    assert role_policy(aws) == expected_policy(MODEL_A)
    assert serving_model(aws)["PrimaryContainer"]["ModelDataUrl"] == MODEL_A


def test_no_wait_keeps_the_serving_artifact_until_the_next_deploy(cli, moto, aws, staged, updates):
    assert deploy(cli, "--model-data", MODEL_A)[0] == 0
    updates()
    status, _, err = deploy(cli, "--model-data", MODEL_B, "--no-wait")
    assert status == 0, err
    assert role_policy(aws) == expected_policy(MODEL_A, MODEL_B)
    assert "also reads the serving model until the next deploy" in err
    status, _, err = deploy(cli, "--model-data", MODEL_B)
    assert status == 0, err
    assert role_policy(aws) == expected_policy(MODEL_B)


# ----------------------------------------------------------------------------- --role-arn, dry run


def test_role_arn_runs_the_model_with_that_role_and_leaves_the_endpoint_role_alone(cli, moto, aws, staged, updates):
    status, out, err = deploy(cli, "--model-data", MODEL_A, "--role-arn", TRAINING_ROLE_ARN)
    assert status == 0, err
    assert [op for op in moto.operations() if op.startswith("iam:")] == []  # not even a look at NAME-endpoint
    assert serving_model(aws)["ExecutionRoleArn"] == TRAINING_ROLE_ARN
    assert [role["RoleName"] for role in aws("iam").list_roles()["Roles"]] == ["kennel-sagemaker"]
    moto.reset_recording()
    status, again, err = deploy(cli, "--model-data", MODEL_A, "--role-arn", TRAINING_ROLE_ARN)
    assert (status, again) == (0, out), err
    assert moto.mutating() == []

    # Back to the default: the model served with the other role is not one NAME-endpoint has to read.
    updates()
    moto.reset_recording()
    status, _, err = deploy(cli, "--model-data", MODEL_B)
    assert status == 0, err
    assert policies_sent(moto) == [expected_policy(MODEL_B)]
    assert serving_model(aws)["ExecutionRoleArn"] == ROLE_ARN


def test_dry_run_plans_the_role_and_sends_nothing(cli, moto, aws, trained, planned):
    status, out, err = deploy(cli, "--dry-run")
    assert status == 0, err
    assert moto.mutating() == []
    plan = planned(out)
    assert [r["operation"] for r in plan] == ["CreateRole", "PutRolePolicy", "CreateModel", "CreateEndpointConfig",
                                              "CreateEndpoint"]
    assert plan[0]["params"]["RoleName"] == ROLE
    assert json.loads(plan[1]["params"]["PolicyDocument"]) == expected_policy(TRAINED)
    assert plan[2]["params"]["ExecutionRoleArn"] == ROLE_ARN
    assert "dry run, not sent: role kennel-endpoint: created" in err
    assert [role["RoleName"] for role in aws("iam").list_roles()["Roles"]] == ["kennel-sagemaker"]


def test_dry_run_of_a_new_artifact_plans_the_wider_policy_and_changes_nothing(cli, moto, aws, staged, planned):
    assert deploy(cli, "--model-data", MODEL_A)[0] == 0
    moto.reset_recording()
    status, out, err = deploy(cli, "--model-data", MODEL_B, "--dry-run")
    assert status == 0, err
    assert moto.mutating() == []
    plan = planned(out)
    assert [r["operation"] for r in plan] == ["PutRolePolicy", "CreateModel", "CreateEndpointConfig", "UpdateEndpoint"]
    assert json.loads(plan[0]["params"]["PolicyDocument"]) == expected_policy(MODEL_A, MODEL_B)
    assert role_policy(aws) == expected_policy(MODEL_A)


# ----------------------------------------------------------------------------- scope from the inputs


def test_image_from_another_repository_scopes_the_pull_to_it(cli, moto, aws, staged):
    digest = "sha256:" + "ab" * 32
    status, _, err = deploy(cli, "--model-data", MODEL_A, "--image",
                            f"{ACCOUNT}.dkr.ecr.eu-west-1.amazonaws.com/team/kennel-serve@{digest}", "--no-wait")
    assert status == 0, err
    statements = {s["Sid"]: s for s in role_policy(aws)["Statement"]}
    assert statements["PullTheServingImage"]["Resource"] == [
        f"arn:aws:ecr:eu-west-1:{ACCOUNT}:repository/team/kennel-serve"]


def test_vpc_endpoint_gets_the_network_interface_calls(cli, moto, aws, staged):
    status, _, err = deploy(cli, "--model-data", MODEL_A, "--subnets", "subnet-1", "--security-groups", "sg-1",
                            "--no-wait")
    assert status == 0, err
    assert role_policy(aws) == expected_policy(MODEL_A, vpc=True)


@pytest.mark.parametrize("argv, message", [
    (["--model-data", f"s3://{BUCKET}/kennel/models/*/model.tar.gz"], "would read '*', '?' or '${' in the key"),
    (["--model-data", f"s3://{BUCKET}/${{aws:username}}/model.tar.gz"], "would read '*', '?' or '${' in the key"),
    (["--model-data", MODEL_A, "--image", "docker.io/library/nginx:latest"], "is not an ECR image URI"),
    (["--model-data", MODEL_A, "--subnets", "subnet-1"], "--subnets and --security-groups go together"),
    (["--model-data", MODEL_A, "--instance-count", "0"], "--instance-count must be at least 1"),
])
def test_inputs_the_role_cannot_be_scoped_to_are_refused_before_any_change(cli, moto, staged, argv, message):
    status, _, err = deploy(cli, *argv)
    assert status == 1
    assert err.count("\n") == 1 and message in err, err
    assert moto.mutating() == []


# ----------------------------------------------------------------------------- IAM propagation, teardown


def test_create_model_waits_out_iam_propagation():
    """SageMaker refuses a role IAM has not propagated yet: CreateModel is retried with back-off."""
    from kennel_ops.aws.context import Aws, Console
    from kennel_ops.aws.endpoint_role import role_not_ready
    from kennel_ops.aws.iam import retry_while_propagating
    client = boto3.Session(region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x").client("sagemaker")
    stubber = Stubber(client)
    stubber.add_client_error("create_model", "ValidationException",
                             f"Could not assume role {ROLE_ARN}. Please ensure that the role exists and allows "
                             "principal 'sagemaker.amazonaws.com' to assume the role.", 400)
    stubber.add_response("create_model", {"ModelArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:model/kennel-m"})
    stubber.activate()
    sleeps: list[float] = []
    notes = io.StringIO()
    aws = Aws(region=REGION, console=Console(io.StringIO(), notes))
    request = {"ModelName": "kennel-m", "ExecutionRoleArn": ROLE_ARN,
               "PrimaryContainer": {"Image": f"{SERVE_URI}:1", "ModelDataUrl": MODEL_A}}
    response = retry_while_propagating(lambda: client.create_model(**request), aws=aws, what="model",
                                       is_propagation_error=role_not_ready, sleep=sleeps.append)
    assert response["ModelArn"].endswith("model/kennel-m")
    assert sleeps == [2.0]
    assert "IAM propagation" in notes.getvalue()
    stubber.assert_no_pending_responses()
    other = ClientError({"Error": {"Code": "ValidationException", "Message": "Could not find model"}}, "CreateModel")
    assert not role_not_ready(other)


def test_teardown_deletes_the_endpoint_role_and_runs_again(cli, moto, aws, deployed):
    status, out, err = cli("teardown", "--yes", "--poll-seconds", "0.01")
    assert status == 0, err
    assert "deleted iam role kennel-endpoint" in out.splitlines()
    assert aws("iam").list_roles()["Roles"] == []
    moto.reset_recording()
    status, out, err = cli("teardown", "--yes")
    assert (status, out) == (0, "nothing to delete for deployment kennel\n"), err
    assert "absent: iam role kennel-endpoint" in err
    assert moto.mutating() == []


def test_teardown_keep_roles_keeps_the_endpoint_role(cli, moto, aws, deployed):
    status, _, err = cli("teardown", "--yes", "--poll-seconds", "0.01", "--keep-roles")
    assert status == 0, err
    assert role_policy(aws) == expected_policy(TRAINED)
    assert "left: IAM roles kennel-lambda, kennel-endpoint, kennel-sagemaker" in err
