"""Multi-model endpoints against moto in server mode: deploy --multi-model (its model, endpoint
and role), add-model (a reproducible NAME.tar.gz under the prefix, through the managed
transfer), list-models.

Everything runs on moto; each command runs twice (the second sends nothing) and under
--dry-run (nothing but reads reaches moto). moto has no UpdateEndpoint, so moving a live
endpoint to multi-model is checked on its dry-run plan.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from urllib.parse import parse_qs

import pytest

from aws_testkit import ACCOUNT, BUCKET

pytestmark = pytest.mark.aws

PREFIX = f"s3://{BUCKET}/models/"
PREFIX_ARN = f"arn:aws:s3:::{BUCKET}/models/*"
SERVE_REPOSITORY_ARN = f"arn:aws:ecr:us-east-1:{ACCOUNT}:repository/kennel-serve"
TRAINED = f"arn:aws:s3:::{BUCKET}/kennel/models/kennel-t1/output/model.tar.gz"
POLL = ["--poll-seconds", "0.01"]
PACKED = ["code", "code/inference.py", "kennel.json", "model.onnx"]  # model.pth left out


def serving_model(aws) -> dict:
    sagemaker = aws("sagemaker")
    config = sagemaker.describe_endpoint_config(
        EndpointConfigName=sagemaker.describe_endpoint(EndpointName="kennel")["EndpointConfigName"])
    return sagemaker.describe_model(ModelName=config["ProductionVariants"][0]["ModelName"])


def statements(policy: dict) -> dict[str, dict]:
    return {statement["Sid"]: statement for statement in policy["Statement"]}


def role_policy(aws) -> dict:
    return aws("iam").get_role_policy(RoleName="kennel-endpoint", PolicyName="kennel-endpoint-execution")[
        "PolicyDocument"]


# ----------------------------------------------------------------------------- deploy --multi-model


def test_deploy_multi_model_then_unchanged(cli, moto, aws, staged):
    argv = ["deploy", "--multi-model", PREFIX, *POLL]
    status, out, err = cli(*argv)
    assert status == 0, err
    assert out.splitlines()[-1] == f"models {PREFIX}"
    (request,) = moto.sent("SageMaker.CreateModel")
    container = request["PrimaryContainer"]
    assert container["Mode"] == "MultiModel" and container["ModelDataUrl"] == PREFIX
    assert container["MultiModelConfig"] == {"ModelCacheSetting": "Enabled"}
    model = serving_model(aws)
    assert model["PrimaryContainer"]["Mode"] == "MultiModel"
    assert model["PrimaryContainer"]["ModelDataUrl"] == PREFIX
    assert model["PrimaryContainer"]["MultiModelConfig"] == {"ModelCacheSetting": "Enabled"}
    assert model["ExecutionRoleArn"] == f"arn:aws:iam::{ACCOUNT}:role/kennel-endpoint"
    (config,) = moto.sent("SageMaker.CreateEndpointConfig")
    assert config["ProductionVariants"][0]["InstanceType"] == "ml.m5.large"  # a real-time endpoint as ever
    assert aws("sagemaker").describe_endpoint(EndpointName="kennel")["EndpointStatus"] == "InService"
    # The role reads every object under the prefix, and nothing else in S3; the rest is as for one model.
    found = statements(role_policy(aws))
    assert found["ReadTheModel"] == {"Sid": "ReadTheModel", "Effect": "Allow", "Action": "s3:GetObject",
                                     "Resource": [PREFIX_ARN]}
    assert sorted(found) == ["EcrLogin", "PublishMetrics", "PullTheServingImage", "ReadTheModel", "WriteLogs"]
    assert found["PullTheServingImage"]["Resource"] == [SERVE_REPOSITORY_ARN]
    s3_actions = [s["Action"] for s in found.values() if str(s["Action"]).startswith("s3:")]
    assert s3_actions == ["s3:GetObject"]

    moto.reset_recording()
    status, again, err = cli(*argv)
    assert (status, again) == (0, out), err
    assert moto.mutating() == []
    assert len(aws("sagemaker").list_models()["Models"]) == 1
    assert len(aws("sagemaker").list_endpoint_configs()["EndpointConfigs"]) == 1


def test_deploy_multi_model_dry_run_sends_nothing(cli, moto, aws, staged, planned):
    status, out, err = cli("deploy", "--multi-model", PREFIX, "--model-cache", "disabled", "--dry-run")
    assert status == 0, err
    assert moto.mutating() == []
    plan = planned(out)
    assert [r["operation"] for r in plan] == ["CreateRole", "PutRolePolicy", "CreateModel", "CreateEndpointConfig",
                                              "CreateEndpoint"]
    container = plan[2]["params"]["PrimaryContainer"]
    assert (container["Mode"], container["ModelDataUrl"]) == ("MultiModel", PREFIX)
    assert container["MultiModelConfig"] == {"ModelCacheSetting": "Disabled"}
    policy = json.loads(plan[1]["params"]["PolicyDocument"])
    assert statements(policy)["ReadTheModel"]["Resource"] == [PREFIX_ARN]
    assert aws("sagemaker").list_models()["Models"] == []
    assert aws("sagemaker").list_endpoints()["Endpoints"] == []


def test_moving_a_live_endpoint_to_multi_model_reads_both_until_it_has_moved(cli, moto, deployed, planned):
    """While the update rolls out the old variant may still start instances: the role reads its
    artifact and the new prefix (the plan; moto has no UpdateEndpoint)."""
    status, out, err = cli("deploy", "--multi-model", PREFIX, "--dry-run")
    assert status == 0, err
    assert moto.mutating() == []
    plan = planned(out)
    assert [r["operation"] for r in plan] == ["PutRolePolicy", "CreateModel", "CreateEndpointConfig",
                                              "UpdateEndpoint"]
    policy = json.loads(plan[0]["params"]["PolicyDocument"])
    assert statements(policy)["ReadTheModel"]["Resource"] == [TRAINED, PREFIX_ARN]


@pytest.mark.parametrize("argv, status, message", [
    (["--multi-model", PREFIX, "--serverless"], 1,
     "--multi-model cannot go with --serverless: SageMaker has no serverless multi-model endpoints"),
    (["--multi-model", PREFIX, "--async", "--output", f"s3://{BUCKET}/async/"], 1,
     "--multi-model cannot go with --async: InvokeEndpointAsync cannot name a target model"),
    (["--model-cache", "disabled"], 1, "--model-cache goes with --multi-model"),
    (["--multi-model", f"s3://{BUCKET}/models"], 2, "the models' prefix must end with '/'"),
    (["--multi-model", f"s3://{BUCKET}/"], 2, "not its root"),
    (["--multi-model", f"s3://{BUCKET}/m*/"], 2, "as a pattern"),
    (["--multi-model", "models/"], 2, "expected s3://BUCKET/PREFIX"),
    (["--multi-model", PREFIX, "--model-data", f"s3://{BUCKET}/m/model.tar.gz"], 2, "not allowed with argument"),
    (["--multi-model", PREFIX, "--model-cache", "sometimes"], 2, "invalid choice: 'sometimes'"),
])
def test_deploy_multi_model_refusals_are_one_line(cli, moto, staged, argv, status, message):
    result, out, err = cli("deploy", *argv)
    assert (result, out) == (status, "")
    assert err.count("\n") == 1 and message in err, err
    assert moto.mutating() == []


# ----------------------------------------------------------------------------- add-model


def error_line(err: str) -> str:
    """The one error line of a failed command (progress notes may come before it)."""
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0], err
    return errors[0]


def object_bytes(aws, key: str) -> bytes:
    return aws("s3").get_object(Bucket=BUCKET, Key=key)["Body"].read()


def members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        return archive.getmembers()


@pytest.fixture
def bucket(moto, aws):
    aws("s3").create_bucket(Bucket=BUCKET)
    moto.reset_recording()


def test_add_model_uploads_a_reproducible_tar_without_the_weights(cli, moto, aws, bucket, model_folder):
    folder = model_folder("rex")
    status, out, err = cli("add-model", folder, PREFIX, "--tags", "team=ml")
    assert status == 0, err
    assert out.splitlines() == ["target-model rex.tar.gz", f"object {PREFIX}rex.tar.gz"]
    data = object_bytes(aws, "models/rex.tar.gz")
    entries = members(data)
    assert [entry.name for entry in entries] == PACKED
    assert {(entry.mtime, entry.uid, entry.gid, entry.uname, entry.gname) for entry in entries} == {
        (315532800, 0, 0, "", "")}
    assert {entry.name: entry.mode for entry in entries} == {"code": 0o755, "code/inference.py": 0o644,
                                                             "kennel.json": 0o644, "model.onnx": 0o644}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        assert archive.extractfile("model.onnx").read() == (folder / "model.onnx").read_bytes()
    head = aws("s3").head_object(Bucket=BUCKET, Key="models/rex.tar.gz")
    assert head["ContentType"] == "application/gzip" and len(head["Metadata"]["kennel-tar-sha256"]) == 64
    tags = aws("s3").get_object_tagging(Bucket=BUCKET, Key="models/rex.tar.gz")["TagSet"]
    assert {tag["Key"]: tag["Value"] for tag in tags} == {"team": "ml", "kennel:deployment": "kennel"}

    # Again: the same model is there already, nothing is sent.
    moto.reset_recording()
    status, again, err = cli("add-model", folder, PREFIX, "--tags", "team=ml")
    assert (status, again) == (0, out), err
    assert "holds this model already" in err
    assert moto.mutating() == []

    # The same model, its files touched since, under another name: the very same bytes.
    os.utime(folder / "model.onnx", (1_700_000_000, 1_700_000_000))
    os.chmod(folder / "kennel.json", 0o600)
    status, out, err = cli("add-model", folder, PREFIX, "--model-name", "rex-copy")
    assert status == 0, err
    assert out.splitlines()[0] == "target-model rex-copy.tar.gz"
    assert object_bytes(aws, "models/rex-copy.tar.gz") == data


def test_add_model_goes_through_the_managed_transfer(cli, moto, aws, bucket, model_folder):
    """A model over boto3's 8 MiB multipart threshold is uploaded in parts (the ONNX bytes are
    random, so the gzip stays that large)."""
    folder = model_folder("big", onnx=os.urandom(9 * 1024 * 1024))
    status, _, err = cli("add-model", folder, PREFIX)
    assert status == 0, err
    operations = [request.operation for request in moto.requests() if request.mutating]
    key = f"/{BUCKET}/models/big.tar.gz"
    # CreateMultipartUpload and CompleteMultipartUpload POST to the key, each part is a PUT to it.
    assert operations.count(f"POST {key}") == 2 and operations.count(f"PUT {key}") == 2, operations
    assert [entry.name for entry in members(object_bytes(aws, "models/big.tar.gz"))] == PACKED


def test_add_model_dry_run_sends_nothing(cli, moto, aws, bucket, model_folder, planned):
    status, out, err = cli("add-model", model_folder("rex"), PREFIX, "--dry-run")
    assert status == 0, err
    assert moto.mutating() == []
    (upload,) = planned(out)
    assert upload["operation"] == "upload_file"
    assert (upload["params"]["Bucket"], upload["params"]["Key"]) == (BUCKET, "models/rex.tar.gz")
    assert len(upload["params"]["ExtraArgs"]["Metadata"]["kennel-tar-sha256"]) == 64
    assert parse_qs(upload["params"]["ExtraArgs"]["Tagging"]) == {"kennel:deployment": ["kennel"]}
    assert out.splitlines()[-2:] == ["target-model rex.tar.gz", f"object {PREFIX}rex.tar.gz"]
    assert "Contents" not in aws("s3").list_objects_v2(Bucket=BUCKET, Prefix="models/")


def test_add_model_refuses_another_model_under_a_name_taken(cli, moto, aws, bucket, model_folder):
    assert cli("add-model", model_folder("rex"), PREFIX)[0] == 0
    before = object_bytes(aws, "models/rex.tar.gz")
    moto.reset_recording()
    other = model_folder("other", onnx=b"another graph")
    status, out, err = cli("add-model", other, PREFIX, "--model-name", "rex")
    assert (status, out) == (1, "")
    assert error_line(err) == (f"error: {PREFIX}rex.tar.gz holds another model, and instances that loaded it "
                               "would go on serving it: add this one under a new --model-name")
    assert moto.mutating() == []
    assert object_bytes(aws, "models/rex.tar.gz") == before


def test_add_model_refusals_are_one_line(cli, moto, bucket, model_folder, tmp_path):
    folder = model_folder("rex")
    spaced = tmp_path / "my model"
    spaced.mkdir()
    for name in ("kennel.json", "model.onnx"):
        (spaced / name).write_bytes((folder / name).read_bytes())
    (tmp_path / "empty").mkdir()
    for argv, status, message in (
            ([folder, f"s3://{BUCKET}/models"], 2, "the models' prefix must end with '/'"),
            ([folder, f"s3://{BUCKET}/"], 2, "not its root"),
            ([folder, PREFIX, "--model-name", "a/b"], 1, "invalid model name 'a/b'"),
            ([folder, PREFIX, "--model-name", "rex.tar.gz-"], 1, "invalid model name"),
            ([folder, PREFIX, "--model-name", "r" * 101], 1, "invalid model name"),
            ([spaced, PREFIX], 1, "invalid model name 'my model'"),
            ([tmp_path / "empty", PREFIX], 1, "is not a kennel model: "),
            ([tmp_path / "absent", PREFIX], 1, "is not a folder")):
        result, out, err = cli("add-model", *argv)
        assert (result, out) == (status, ""), err
        assert err.count("\n") == 1 and message in err, err
    _, _, err = cli("add-model", spaced, PREFIX)
    assert err.rstrip().endswith("(pass --model-name)")
    assert moto.mutating() == []


def test_add_model_into_a_missing_bucket_is_one_line(cli, moto, model_folder):
    status, _, err = cli("add-model", model_folder("rex"), PREFIX)
    assert status == 1
    assert error_line(err).startswith(f"error: upload to {PREFIX}rex.tar.gz failed: ") and "NoSuchBucket" in err


# ----------------------------------------------------------------------------- list-models


def test_list_models_lists_the_models_directly_under_the_prefix(cli, moto, aws, bucket, model_folder):
    status, out, err = cli("list-models", PREFIX)
    assert (status, out) == (0, "") and "no models under" in err
    for name in ("rex", "akita"):
        assert cli("add-model", model_folder(name), PREFIX)[0] == 0
    s3 = aws("s3")
    s3.put_object(Bucket=BUCKET, Key="models/notes.txt", Body=b"not a model")
    s3.put_object(Bucket=BUCKET, Key="models/old/v1.tar.gz", Body=b"in a sub-folder")
    s3.put_object(Bucket=BUCKET, Key="elsewhere.tar.gz", Body=b"outside the prefix")
    moto.reset_recording()
    status, out, err = cli("list-models", PREFIX)
    assert status == 0, err
    lines = [line.split(" ") for line in out.splitlines()]
    assert [line[0] for line in lines] == ["akita.tar.gz", "rex.tar.gz"]
    sizes = {obj["Key"]: obj["Size"] for obj in s3.list_objects_v2(Bucket=BUCKET, Prefix="models/")["Contents"]}
    assert [int(line[1]) for line in lines] == [sizes["models/akita.tar.gz"], sizes["models/rex.tar.gz"]]
    assert moto.mutating() == []


def test_list_models_of_a_missing_bucket_is_one_line(cli, moto):
    status, _, err = cli("list-models", PREFIX)
    assert status == 1 and err.count("\n") == 1 and "NoSuchBucket" in err
