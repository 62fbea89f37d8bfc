"""What train and tune share: flags, inputs and the training-job definition.

Channels: --data S3URI is the original layout, one `training` channel holding
train/ valid/ test/; --train/--valid[/--test] give one channel each. An
optional `pretrained` channel carries a torchvision state_dict (ImageNet
weights) for runs without internet access. Outputs all go under --output
(default s3://<data bucket>/NAME/): models/, checkpoints/<job>/, tensorboard/<job>/.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kennel_ops.aws.context import Aws, CliError, describe_or_none
from kennel_ops.aws.ecr import newest_image_uri
from kennel_ops.aws.names import Names
from kennel_ops.aws.s3 import S3Uri, has_objects, s3_uri
from kennel_ops.checkout import REPO

METRIC_DEFINITIONS = REPO / "containers" / "train" / "kennel_train" / "metric_definitions.json"
CHECKPOINT_LOCAL_PATH = "/opt/ml/checkpoints"
TENSORBOARD_LOCAL_PATH = "/opt/ml/output/tensorboard"
# SageMaker limits: 100 hyperparameters, keys 256 and values 2500 characters; 40 metric definitions.
MAX_HYPERPARAMETERS, MAX_KEY, MAX_VALUE, MAX_METRICS = 100, 256, 2500, 40


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def seconds(text: str) -> int:
    value = int(text)
    if value < 60:
        raise argparse.ArgumentTypeError(f"at least 60 seconds, got {value}")
    return value


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the training-job definition, common to train and tune."""
    image = parser.add_argument_group("image and role")
    image.add_argument("--image", help="training image URI (default: the newest image in ECR NAME-train)")
    image.add_argument("--role-arn", help="execution role (default: NAME-sagemaker, made by the role command)")
    data = parser.add_argument_group("data (original layout: --data; split: --train --valid [--test])")
    data.add_argument("--data", type=s3_uri, metavar="S3URI", help="one `training` channel holding train/ valid/ test/")
    data.add_argument("--train", type=s3_uri, metavar="S3URI", help="the `train` channel")
    data.add_argument("--valid", type=s3_uri, metavar="S3URI", help="the `valid` channel")
    data.add_argument("--test", type=s3_uri, metavar="S3URI", help="the `test` channel (optional)")
    data.add_argument("--pretrained", type=s3_uri, metavar="S3URI",
                      help="the `pretrained` channel: a torchvision state_dict .pth (no download at run time)")
    data.add_argument("--input-mode", choices=("File", "FastFile"), default="File",
                      help="File copies the data first; FastFile streams it from S3 (%(default)s)")
    data.add_argument("--output", type=s3_uri, metavar="S3URI",
                      help="base for models/, checkpoints/, tensorboard/ (default: s3://<data bucket>/NAME/)")
    job = parser.add_argument_group("job")
    job.add_argument("--hyperparameter", "-p", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                     help="a hyperparameter of the training image (repeatable), e.g. -p epochs=5")
    job.add_argument("--instance-type", default="ml.m5.xlarge", help="(%(default)s)")
    job.add_argument("--instance-count", type=int, default=1, help="hosts; >1 trains data-parallel (%(default)s)")
    job.add_argument("--volume-gb", type=int, default=30, help="EBS volume per host, GB (%(default)s)")
    job.add_argument("--max-runtime", type=seconds, default=4 * 3600, metavar="SECONDS",
                     help="stop the job after this long (%(default)s)")
    job.add_argument("--spot", action="store_true", help="managed spot training (up to ~70%% cheaper, may wait)")
    job.add_argument("--max-wait", type=seconds, metavar="SECONDS",
                     help="with --spot: total time including waiting for capacity (default: 2 x --max-runtime)")
    job.add_argument("--env", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                     help="environment variable of the training container (repeatable)")
    job.add_argument("--subnets", type=csv_list, metavar="ID[,ID]", help="run in these VPC subnets")
    job.add_argument("--security-groups", type=csv_list, metavar="ID[,ID]", help="with --subnets")
    job.add_argument("--network-isolation", action="store_true",
                     help="no network access from the container (give --pretrained weights)")
    job.add_argument("--metric-definitions", type=Path, default=METRIC_DEFINITIONS, metavar="FILE",
                     help="MetricDefinitions JSON exported by the training image (default: the repository's)")
    wait = parser.add_argument_group("waiting")
    wait.add_argument("--no-wait", action="store_true", help="return once the job is created")
    wait.add_argument("--poll-seconds", type=float, default=30.0, help="status poll interval (%(default)s)")


def load_metric_definitions(path: Path) -> list[dict[str, str]]:
    try:
        definitions = json.loads(path.read_text())
    except FileNotFoundError:
        raise CliError(f"no metric definitions at {path} (pass --metric-definitions FILE)") from None
    except json.JSONDecodeError as error:
        raise CliError(f"{path} is not JSON: {error}") from None
    if (not isinstance(definitions, list) or not definitions
            or not all(isinstance(d, dict) and set(d) == {"Name", "Regex"} for d in definitions)):
        raise CliError(f"{path}: expected a non-empty JSON list of {{\"Name\", \"Regex\"}} objects")
    if len(definitions) > MAX_METRICS:
        raise CliError(f"{path}: {len(definitions)} metric definitions, SageMaker takes at most {MAX_METRICS}")
    return definitions


def hyperparameters(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """SageMaker hyperparameters are strings; the last value of a repeated key wins."""
    result = dict(pairs)
    if len(result) > MAX_HYPERPARAMETERS:
        raise CliError(f"{len(result)} hyperparameters, SageMaker takes at most {MAX_HYPERPARAMETERS}")
    for key, value in result.items():
        if len(key) > MAX_KEY or len(value) > MAX_VALUE:
            raise CliError(f"hyperparameter {key[:40]!r}: keys are at most {MAX_KEY}, values {MAX_VALUE} characters")
    return result


@dataclass(frozen=True)
class Inputs:
    channels: dict[str, S3Uri]
    output: S3Uri


def resolve_inputs(args: argparse.Namespace, names: Names) -> Inputs:
    split = {name: getattr(args, name) for name in ("train", "valid", "test") if getattr(args, name)}
    if args.data and split:
        raise CliError("give either --data (original layout) or --train/--valid/--test, not both")
    if args.data:
        channels = {"training": args.data}
    elif split:
        if "train" not in split or "valid" not in split:
            raise CliError("split channels need both --train and --valid")
        channels = dict(split)
    else:
        raise CliError("no data: pass --data s3://BUCKET/dogImages/ (train/ valid/ test/ inside) or --train/--valid")
    if args.pretrained:
        channels["pretrained"] = args.pretrained
    first = next(iter(channels.values()))
    return Inputs(channels, args.output or S3Uri(first.bucket, f"{names.base}/"))


def check_pretrained(inputs: Inputs, hps: dict[str, str]) -> None:
    """The training image starts from ImageNet weights by default and never downloads them.

    Without a `pretrained` channel such a job would fail after paying for its
    start-up; an explicit pretrained=true (an image with the weights in its
    torch hub cache) or pretrained=false goes through.
    """
    if "pretrained" not in inputs.channels and "pretrained" not in hps:
        raise CliError("the training image starts from ImageNet weights and never downloads them: pass "
                       "--pretrained s3://.../ (holding torchvision's resnet50-0676ba61.pth, or the file for your "
                       "architecture), or -p pretrained=false to train from random weights")


def check_data(aws: Aws, inputs: Inputs) -> None:
    """Fail before paying for instances when a channel is empty or the layout is wrong."""
    if "training" in inputs.channels:
        data = inputs.channels["training"]
        for split in ("train", "valid"):
            if not has_objects(aws, data.child(split)):
                raise CliError(f"{data} has no {split}/ folder: the original layout is train/ valid/ test/ "
                               "under one prefix (or use --train/--valid)")
    for name, uri in inputs.channels.items():
        if name != "training" and not has_objects(aws, uri):
            raise CliError(f"channel {name}: nothing under {uri}")


def resolve_role(aws: Aws, args: argparse.Namespace, names: Names) -> str:
    if args.role_arn:
        return args.role_arn
    found = describe_or_none(aws.client("iam").get_role, RoleName=names.sagemaker_role)
    if found is None:
        raise CliError(f"no role {names.sagemaker_role}: run `kennel-aws role --bucket BUCKET` first, or pass --role-arn")
    return found["Role"]["Arn"]


def resolve_image(aws: Aws, args: argparse.Namespace, repository: str) -> str:
    return args.image or newest_image_uri(aws, repository)


def channel(name: str, uri: S3Uri) -> dict:
    return {"ChannelName": name, "DataSource": {"S3DataSource": {
        "S3DataType": "S3Prefix", "S3Uri": str(uri), "S3DataDistributionType": "FullyReplicated"}}}


def job_definition(args: argparse.Namespace, *, image: str, role: str, inputs: Inputs,
                   metrics: list[dict[str, str]]) -> dict[str, Any]:
    """The fields a CreateTrainingJob request and a tuning job's TrainingJobDefinition share."""
    if args.instance_count < 1:
        raise CliError("--instance-count must be at least 1")
    if bool(args.subnets) != bool(args.security_groups):
        raise CliError("--subnets and --security-groups go together")
    stopping: dict[str, int] = {"MaxRuntimeInSeconds": args.max_runtime}
    if args.spot:
        max_wait = args.max_wait or 2 * args.max_runtime
        if max_wait <= args.max_runtime:
            raise CliError(f"--max-wait ({max_wait}) must be longer than --max-runtime ({args.max_runtime})")
        stopping["MaxWaitTimeInSeconds"] = max_wait
    elif args.max_wait:
        raise CliError("--max-wait only applies with --spot")
    definition: dict[str, Any] = {
        "AlgorithmSpecification": {"TrainingImage": image, "TrainingInputMode": args.input_mode,
                                   "MetricDefinitions": metrics},
        "RoleArn": role,
        "InputDataConfig": [channel(name, uri) for name, uri in inputs.channels.items()],
        "OutputDataConfig": {"S3OutputPath": str(inputs.output.child("models"))},
        "ResourceConfig": {"InstanceType": args.instance_type, "InstanceCount": args.instance_count,
                           "VolumeSizeInGB": args.volume_gb},
        "StoppingCondition": stopping,
        "EnableManagedSpotTraining": args.spot,
        "EnableNetworkIsolation": args.network_isolation,
    }
    if args.subnets:
        definition["VpcConfig"] = {"Subnets": args.subnets, "SecurityGroupIds": args.security_groups}
    if args.env:
        definition["Environment"] = dict(args.env)
    return definition


def final_metrics(description: dict) -> dict[str, float]:
    return {m["MetricName"]: m["Value"] for m in description.get("FinalMetricDataList") or []}
