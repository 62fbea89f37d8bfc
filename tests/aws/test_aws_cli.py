"""What every command shares: failures as one line, the dry-run safety net, waiting."""
from __future__ import annotations

import io

import boto3
import pytest
from botocore.stub import Stubber

from aws_testkit import REGION

pytestmark = pytest.mark.aws


def test_no_credentials_is_one_line(cli, moto, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    status, out, err = cli("autoscale", "--remove")
    assert (status, out) == (1, "")
    assert err == ("error: no AWS credentials found: set AWS_PROFILE (or --profile), or "
                   "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY\n")


def test_unknown_profile_is_one_line(cli, moto):
    status, _, err = cli("role", "--bucket", "b", "--profile", "nosuchprofile")
    assert status == 1
    assert err == "error: The config profile (nosuchprofile) could not be found\n"


def test_a_refused_request_is_one_line_naming_the_operation(cli, moto, aws):
    status, _, err = cli("deploy", "--model-data", "s3://kennel-data/model.tar.gz", "--image", "x", "--role-arn",
                         "arn:aws:iam::123456789012:role/r", "--instance-type", "ml.bogus.large", "--no-wait")
    assert status == 1
    assert err.splitlines()[-1].startswith("error: CreateEndpointConfig failed: ValidationException: ")
    assert "Traceback" not in err


def test_bad_flags_exit_2_in_one_line(cli):
    status, out, err = cli("autoscale", "--target", "fast")
    assert (status, out) == (2, "")
    assert err == "kennel-aws autoscale: error: argument --target: invalid float value: 'fast' (see --help)\n"
    status, _, err = cli("deploy", "--name", "bad_name")
    assert status == 2 and "invalid name 'bad_name'" in err and err.count("\n") == 1


def test_every_command_has_help(cli):
    for command in ("push", "role", "train", "tune", "deploy", "add-model", "list-models", "autoscale", "dashboard",
                    "lambda", "invoke-async", "teardown"):
        status, out, _ = cli(command, "--help")
        assert status == 0
        assert "--dry-run" in out and "--region" in out and "--name" in out and "--tags" in out


def test_dry_run_clients_refuse_mutating_calls_before_the_network(monkeypatch):
    """The safety net: a mutating call made past Aws.send under --dry-run never reaches the wire."""
    from kennel_ops.aws.context import Aws, Console, DryRunViolation
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens; must not be reached
    aws = Aws(region=REGION, dry_run=True, console=Console(io.StringIO(), io.StringIO()),
              session=boto3.Session(region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x"))
    with pytest.raises(DryRunViolation, match="CreateRole would change AWS state"):
        aws.client("iam").create_role(RoleName="r", AssumeRolePolicyDocument="{}")
    with pytest.raises(DryRunViolation, match="DeleteEndpoint"):
        aws.client("sagemaker").delete_endpoint(EndpointName="kennel")


def test_running_jobs_keep_the_execution_role():
    """teardown keeps NAME-sagemaker while one of the deployment's jobs runs (moto's jobs never run: Stubber)."""
    from kennel_ops.aws.context import Aws, Console
    from kennel_ops.aws.names import Names
    from kennel_ops.aws.teardown import running_jobs
    session = boto3.Session(region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
    aws = Aws(region=REGION, console=Console(io.StringIO(), io.StringIO()), session=session)
    client = aws.client("sagemaker")
    stubber = Stubber(client)
    summary = {"TrainingJobArn": "arn:aws:sagemaker:us-east-1:1:training-job/x", "CreationTime": 0,
               "TrainingJobStatus": "InProgress"}
    stubber.add_response("list_training_jobs", {"TrainingJobSummaries": [
        {**summary, "TrainingJobName": "kennel-20260101-000000"},
        {**summary, "TrainingJobName": "kennelx-20260101-000000"}]},  # another deployment's
        {"NameContains": "kennel", "StatusEquals": "InProgress"})
    stubber.add_response("list_hyper_parameter_tuning_jobs", {"HyperParameterTuningJobSummaries": [{
        "HyperParameterTuningJobName": "kennel-260101-000000", "HyperParameterTuningJobArn": "arn:x",
        "HyperParameterTuningJobStatus": "InProgress", "Strategy": "Bayesian", "CreationTime": 0,
        "TrainingJobStatusCounters": {}, "ObjectiveStatusCounters": {}}]},
        {"NameContains": "kennel", "StatusEquals": "InProgress"})
    stubber.activate()
    assert running_jobs(aws, Names("kennel")) == ["kennel-20260101-000000", "kennel-260101-000000"]
    stubber.assert_no_pending_responses()


def test_waiting_prints_changes_and_a_heartbeat_then_times_out():
    from kennel_ops.aws.context import CliError, Console
    from kennel_ops.aws.waiting import Poll, wait_for
    now = [0.0]
    states = iter(["Creating", "Creating", "Creating", "Creating"])
    err = io.StringIO()
    with pytest.raises(CliError, match=r"endpoint kennel still Creating after 3:00; it goes on in AWS"):
        wait_for("endpoint kennel", lambda: {"S": next(states)}, status=lambda d: d["S"], done={"InService"},
                 failed={"Failed"}, console=Console(io.StringIO(), err),
                 poll=Poll(interval_s=60, timeout_s=180, heartbeat_s=120),
                 clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert err.getvalue().splitlines() == ["[0:00] endpoint kennel: Creating", "[2:00] endpoint kennel: Creating"]
