"""role, train and tune against moto in server mode.

moto completes training and tuning jobs at once, so the waits end at the first
poll; a job that fails while waited for is covered with botocore's Stubber.
moto's DescribeTrainingJob replaces MetricDefinitions with a canned one, so the
definitions sent are read from the request moto recorded. moto's tuning job
reports a canned best training job; the test checks that what the command
prints is what DescribeHyperParameterTuningJob answered.
"""
from __future__ import annotations

import json

import pytest
from botocore.stub import Stubber

from aws_testkit import ACCOUNT, BUCKET, DATA, WEIGHTS

pytestmark = pytest.mark.aws

ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/kennel-sagemaker"
TRAIN_URI = f"{ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com/kennel-train"
# ----------------------------------------------------------------------------- role


def test_role_is_least_privilege_and_idempotent(cli, moto, aws):
    status, out, err = cli("role", "--bucket", BUCKET, "--bucket", "kennel-weights", "--tags", "team=ml")
    assert status == 0, err
    assert out.strip() == ROLE_ARN
    iam = aws("iam")
    role = iam.get_role(RoleName="kennel-sagemaker")["Role"]
    assert role["AssumeRolePolicyDocument"]["Statement"] == [{
        "Sid": "SageMakerOnlyForThisAccount", "Effect": "Allow", "Principal": {"Service": "sagemaker.amazonaws.com"},
        "Action": "sts:AssumeRole", "Condition": {"StringEquals": {"aws:SourceAccount": ACCOUNT}}}]
    assert {t["Key"]: t["Value"] for t in role["Tags"]} == {"team": "ml", "kennel:deployment": "kennel"}
    assert iam.list_role_policies(RoleName="kennel-sagemaker")["PolicyNames"] == ["kennel-sagemaker-execution"]
    assert iam.list_attached_role_policies(RoleName="kennel-sagemaker")["AttachedPolicies"] == []
    policy = iam.get_role_policy(RoleName="kennel-sagemaker", PolicyName="kennel-sagemaker-execution")["PolicyDocument"]
    statements = {s["Sid"]: s for s in policy["Statement"]}
    assert statements["ListTheBuckets"]["Resource"] == ["arn:aws:s3:::kennel-data", "arn:aws:s3:::kennel-weights"]
    assert statements["ReadData"]["Resource"] == ["arn:aws:s3:::kennel-data/*", "arn:aws:s3:::kennel-weights/*"]
    assert statements["WriteOutputs"]["Resource"] == "arn:aws:s3:::kennel-data/kennel/*"
    assert statements["PullTheImages"]["Resource"] == [
        f"arn:aws:ecr:us-east-1:{ACCOUNT}:repository/kennel-train",
        f"arn:aws:ecr:us-east-1:{ACCOUNT}:repository/kennel-serve"]
    wildcard = sorted(s["Sid"] for s in policy["Statement"] if s["Resource"] == "*")
    assert wildcard == ["EcrLogin", "PublishMetrics"]  # actions that take no resource ARN
    assert statements["PublishMetrics"]["Condition"] == {"StringLike": {"cloudwatch:namespace": "/aws/sagemaker/*"}}
    assert "RunInTheVpc" not in statements

    moto.reset_recording()
    status, again, err = cli("role", "--bucket", BUCKET, "--bucket", "kennel-weights")
    assert (status, again) == (0, out), err
    assert moto.mutating() == []

    status, _, err = cli("role", "--bucket", BUCKET, "--bucket", "kennel-weights", "--vpc")
    assert status == 0, err
    assert moto.mutating() == ["iam:PutRolePolicy"]
    policy = iam.get_role_policy(RoleName="kennel-sagemaker", PolicyName="kennel-sagemaker-execution")["PolicyDocument"]
    assert "RunInTheVpc" in {s["Sid"] for s in policy["Statement"]}


def test_role_dry_run_creates_nothing(cli, moto, aws, planned):
    status, out, err = cli("role", "--bucket", BUCKET, "--dry-run")
    assert status == 0, err
    assert moto.mutating() == []
    assert [r["operation"] for r in planned(out)] == ["CreateRole", "PutRolePolicy"]
    assert aws("iam").list_roles()["Roles"] == []


# ----------------------------------------------------------------------------- train


def train_args(metric_definitions, *extra: str) -> list[str]:
    return ["train", "--data", DATA, "--metric-definitions", str(metric_definitions), "--poll-seconds", "0.01",
            *extra]


def test_train_original_layout_with_spot_twice(cli, moto, aws, staged_with_older_images, metric_definitions):
    argv = train_args(metric_definitions, "--job-name", "kennel-t1", "-p", "epochs=2", "-p", "learning_rate=0.01",
                      "--spot", "--max-runtime", "3600", "--tags", "team=ml", "--pretrained", WEIGHTS)
    status, out, err = cli(*argv)
    assert status == 0, err
    job = aws("sagemaker").describe_training_job(TrainingJobName="kennel-t1")
    assert job["AlgorithmSpecification"]["TrainingImage"] == f"{TRAIN_URI}:1.0.1-bbbbbbbbbbbb"  # the newest
    assert job["AlgorithmSpecification"]["TrainingInputMode"] == "File"
    assert job["RoleArn"] == ROLE_ARN
    assert job["HyperParameters"] == {"epochs": "2", "learning_rate": "0.01"}
    assert [c["ChannelName"] for c in job["InputDataConfig"]] == ["training", "pretrained"]
    assert [c["DataSource"]["S3DataSource"]["S3Uri"] for c in job["InputDataConfig"]] == [DATA, WEIGHTS]
    assert job["OutputDataConfig"]["S3OutputPath"] == f"s3://{BUCKET}/kennel/models/"
    assert job["EnableManagedSpotTraining"] is True
    assert job["StoppingCondition"] == {"MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 7200}
    assert job["CheckpointConfig"] == {"S3Uri": f"s3://{BUCKET}/kennel/checkpoints/kennel-t1/",
                                       "LocalPath": "/opt/ml/checkpoints"}
    assert job["TensorBoardOutputConfig"] == {"S3OutputPath": f"s3://{BUCKET}/kennel/tensorboard/kennel-t1/",
                                              "LocalPath": "/opt/ml/output/tensorboard"}
    (sent,) = moto.sent("SageMaker.CreateTrainingJob")
    assert sent["AlgorithmSpecification"]["MetricDefinitions"] == json.loads(metric_definitions.read_text())
    assert {"Key": "team", "Value": "ml"} in sent["Tags"]
    assert {"Key": "kennel:deployment", "Value": "kennel"} in sent["Tags"]
    lines = out.splitlines()
    assert lines[0] == "job kennel-t1 Completed"
    assert lines[1] == f"model {job['ModelArtifacts']['S3ModelArtifacts']}"
    assert lines[2:] == [f"metric {m['MetricName']} {m['Value']:g}"
                         for m in sorted(job["FinalMetricDataList"], key=lambda m: m["MetricName"])]
    assert "training job kennel-t1: Completed" in err

    moto.reset_recording()
    status, again, err = cli(*argv)
    assert status == 0, err
    assert again == out
    assert "exists (Completed); not creating it again" in err
    assert moto.mutating() == []


def test_train_split_channels_fastfile_vpc_isolation(cli, moto, aws, staged, metric_definitions):
    status, _, err = cli("train", "--train", f"{DATA}train", "--valid", f"{DATA}valid", "--test", f"{DATA}test",
                         "--pretrained", WEIGHTS, "--input-mode", "FastFile",
                         "--subnets", "subnet-1,subnet-2", "--security-groups", "sg-1", "--network-isolation",
                         "--instance-type", "ml.g4dn.xlarge", "--instance-count", "2", "--no-tensorboard",
                         "--image", f"{TRAIN_URI}:custom", "--job-name", "kennel-split",
                         "--metric-definitions", str(metric_definitions), "--no-wait",
                         "--output", f"s3://{BUCKET}/elsewhere")
    assert status == 0, err
    (sent,) = moto.sent("SageMaker.CreateTrainingJob")
    assert [c["ChannelName"] for c in sent["InputDataConfig"]] == ["train", "valid", "test", "pretrained"]
    assert sent["InputDataConfig"][1]["DataSource"]["S3DataSource"]["S3Uri"] == f"{DATA}valid/"
    assert sent["AlgorithmSpecification"] == {"TrainingImage": f"{TRAIN_URI}:custom", "TrainingInputMode": "FastFile",
                                              "MetricDefinitions": json.loads(metric_definitions.read_text())}
    assert sent["VpcConfig"] == {"Subnets": ["subnet-1", "subnet-2"], "SecurityGroupIds": ["sg-1"]}
    assert sent["EnableNetworkIsolation"] is True
    assert sent["EnableManagedSpotTraining"] is False
    assert sent["StoppingCondition"] == {"MaxRuntimeInSeconds": 4 * 3600}
    assert sent["ResourceConfig"] == {"InstanceType": "ml.g4dn.xlarge", "InstanceCount": 2, "VolumeSizeInGB": 30}
    assert sent["OutputDataConfig"] == {"S3OutputPath": f"s3://{BUCKET}/elsewhere/models/"}
    assert "TensorBoardOutputConfig" not in sent
    assert aws("sagemaker").describe_training_job(TrainingJobName="kennel-split")["TrainingJobName"] == "kennel-split"


def test_train_dry_run_prints_the_request_and_sends_nothing(cli, moto, aws, staged, metric_definitions, planned):
    status, out, err = cli(*train_args(metric_definitions, "--job-name", "kennel-dry", "--dry-run",
                                       "-p", "pretrained=false"))
    assert status == 0, err
    assert moto.mutating() == []
    (request,) = planned(out)
    assert request["service"] == "sagemaker" and request["operation"] == "CreateTrainingJob"
    assert request["params"]["TrainingJobName"] == "kennel-dry"
    metrics = json.loads(metric_definitions.read_text())
    assert request["params"]["AlgorithmSpecification"]["MetricDefinitions"] == metrics
    assert aws("sagemaker").list_training_jobs()["TrainingJobSummaries"] == []


@pytest.mark.parametrize("extra, message", [
    (["--data", f"s3://{BUCKET}/dogImages/train/"], "has no train/ folder"),
    (["--data", DATA, "--spot", "--max-runtime", "3600", "--max-wait", "3600"], "must be longer than --max-runtime"),
    (["--data", DATA, "--train", f"{DATA}train"], "either --data"),
    (["--train", f"{DATA}train"], "need both --train and --valid"),
    (["--data", DATA, "--subnets", "subnet-1"], "--subnets and --security-groups go together"),
    (["--data", DATA, "--role-arn", ROLE_ARN, "--image", "x", "--metric-definitions", "/nonexistent.json"],
     "no metric definitions at /nonexistent.json"),
])
def test_train_refuses_bad_input_in_one_line(cli, moto, aws, staged, metric_definitions, extra, message):
    argv = ["train", "--metric-definitions", str(metric_definitions), "--job-name", "kennel-bad",
            "--pretrained", WEIGHTS, *extra]
    status, out, err = cli(*argv)
    assert status == 1
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert moto.mutating() == []


def test_train_without_pretrained_weights_says_how_to_give_them(cli, moto, staged, metric_definitions):
    status, _, err = cli(*train_args(metric_definitions))
    assert status == 1
    assert err == ("error: the training image starts from ImageNet weights and never downloads them: pass "
                   "--pretrained s3://.../ (holding torchvision's resnet50-0676ba61.pth, or the file for your "
                   "architecture), or -p pretrained=false to train from random weights\n")
    assert moto.mutating() == []


def test_train_without_role_says_how_to_make_one(cli, moto, aws, metric_definitions):
    aws("s3").create_bucket(Bucket=BUCKET)
    status, _, err = cli(*train_args(metric_definitions, "--image", "x", "-p", "pretrained=false"))
    assert status == 1
    assert err == "error: no role kennel-sagemaker: run `kennel-aws role --bucket BUCKET` first, or pass --role-arn\n"


def test_train_failure_while_waiting_is_one_line(cli, monkeypatch, moto, metric_definitions):
    """A job that fails while waited for (moto's jobs never fail: Stubber)."""
    import boto3
    from kennel_ops.aws.context import Aws
    client = boto3.Session(region_name="us-east-1").client("sagemaker")
    stubber = Stubber(client)
    job = {"TrainingJobName": "kennel-f", "TrainingJobArn": "arn:aws:sagemaker:us-east-1:1:training-job/kennel-f",
           "ModelArtifacts": {"S3ModelArtifacts": ""}, "AlgorithmSpecification": {"TrainingInputMode": "File"},
           "ResourceConfig": {"InstanceCount": 1, "VolumeSizeInGB": 1}, "StoppingCondition": {},
           "CreationTime": 0}
    for _ in range(2):  # the existence check, then the first poll
        stubber.add_response("describe_training_job", {**job, "TrainingJobStatus": "InProgress",
                                                       "SecondaryStatus": "Starting"}, {"TrainingJobName": "kennel-f"})
    stubber.add_response("describe_training_job", {**job, "TrainingJobStatus": "InProgress",
                                                   "SecondaryStatus": "Training"}, {"TrainingJobName": "kennel-f"})
    stubber.add_response("describe_training_job", {**job, "TrainingJobStatus": "Failed", "SecondaryStatus": "Failed",
                                                   "FailureReason": "AlgorithmError: bad hyperparameter epochs='x'"},
                         {"TrainingJobName": "kennel-f"})
    stubber.activate()
    real_client = Aws.client
    monkeypatch.setattr(Aws, "client",
                        lambda self, service: client if service == "sagemaker" else real_client(self, service))
    status, out, err = cli("train", "--job-name", "kennel-f", "--poll-seconds", "0.01", "--data", DATA)
    stubber.assert_no_pending_responses()
    assert status == 1
    assert "training job kennel-f: InProgress (Starting)" in err and "InProgress (Training)" in err
    assert err.splitlines()[-1] == ("error: training job kennel-f is Failed: AlgorithmError: bad hyperparameter "
                                    "epochs='x'")


# ----------------------------------------------------------------------------- tune


def test_tune_original_ranges_minimising_validation_loss(cli, moto, aws, staged, metric_definitions):
    argv = ["tune", "--data", DATA, "--pretrained", WEIGHTS, "--job-name", "kennel-tune-1", "--max-jobs", "6",
            "--parallel-jobs", "3", "-p", "epochs=1", "--spot", "--metric-definitions", str(metric_definitions),
            "--poll-seconds", "0.01"]
    status, out, err = cli(*argv)
    assert status == 0, err
    (sent,) = moto.sent("SageMaker.CreateHyperParameterTuningJob")
    config = sent["HyperParameterTuningJobConfig"]
    assert config["HyperParameterTuningJobObjective"] == {"Type": "Minimize", "MetricName": "valid:loss"}
    assert config["ResourceLimits"] == {"MaxNumberOfTrainingJobs": 6, "MaxParallelTrainingJobs": 3}
    assert config["ParameterRanges"] == {
        "ContinuousParameterRanges": [{"Name": "learning_rate", "MinValue": "0.001", "MaxValue": "0.1",
                                       "ScalingType": "Logarithmic"}],
        "IntegerParameterRanges": [{"Name": "batch_size", "MinValue": "32", "MaxValue": "512",
                                    "ScalingType": "Logarithmic"}]}
    assert config["Strategy"] == "Bayesian" and config["TrainingJobEarlyStoppingType"] == "Auto"
    definition = sent["TrainingJobDefinition"]
    assert definition["StaticHyperParameters"] == {"epochs": "1"}
    assert definition["AlgorithmSpecification"]["MetricDefinitions"] == json.loads(metric_definitions.read_text())
    assert definition["EnableManagedSpotTraining"] is True
    stopping = definition["StoppingCondition"]
    assert stopping["MaxWaitTimeInSeconds"] > stopping["MaxRuntimeInSeconds"]
    assert "CheckpointConfig" not in definition  # trials must not share a checkpoint path

    described = aws("sagemaker").describe_hyper_parameter_tuning_job(HyperParameterTuningJobName="kennel-tune-1")
    assert described["HyperParameterTuningJobConfig"]["ParameterRanges"] == config["ParameterRanges"]
    best = described["BestTrainingJob"]
    objective = best["FinalHyperParameterTuningJobObjectiveMetric"]
    assert out.splitlines() == [f"best {best['TrainingJobName']}",
                                f"objective {objective['MetricName']} {objective['Value']:g}",
                                *[f"hyperparameter {k} {v}" for k, v in sorted(best["TunedHyperParameters"].items())]]

    moto.reset_recording()
    status, again, err = cli(*argv)
    assert (status, again) == (0, out), err
    assert moto.mutating() == []


def test_tune_refuses_a_fixed_tuned_hyperparameter(cli, moto, staged, metric_definitions):
    status, _, err = cli("tune", "--data", DATA, "-p", "learning_rate=0.1", "--metric-definitions",
                         str(metric_definitions))
    assert status == 1
    assert err == "error: learning_rate is tuned: give its range (--learning-rate MIN:MAX), not -p learning_rate=\n"


def test_tune_needs_a_validation_loss_metric(cli, moto, staged, tmp_path):
    definitions = tmp_path / "metrics.json"
    definitions.write_text(json.dumps([{"Name": "test:loss", "Regex": "Testing Loss: ([0-9\\.]+)"}]))
    status, _, err = cli("tune", "--data", DATA, "--metric-definitions", str(definitions), "-p", "pretrained=false")
    assert status == 1
    assert err == "error: no validation-loss metric among test:loss: pass --objective-metric\n"
    assert moto.mutating() == []


def test_tune_name_longer_than_32_is_refused(cli, moto):
    status, _, err = cli("tune", "--data", DATA, "--job-name", "k" * 33)
    assert status == 1 and "longer than 32 characters" in err


def test_the_training_image_metric_definitions_give_the_tuning_objective():
    """The file the training image exports: what train and tune send by default."""
    from kennel_ops.aws.training import METRIC_DEFINITIONS, load_metric_definitions
    from kennel_ops.aws.tune import objective_metric
    definitions = load_metric_definitions(METRIC_DEFINITIONS)
    assert objective_metric(definitions, None) == "valid:loss"
    assert r"Testing Loss: ([0-9\.]+)" in [d["Regex"] for d in definitions]  # the original tuning regex still works
