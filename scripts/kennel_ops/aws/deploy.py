"""Deploy a trained model to the real-time endpoint NAME with the kennel-serve image.

Model and endpoint config are immutable in SageMaker, so their names carry a
digest of their content: deploying the same inputs again changes nothing, and
different inputs (a new model, image, instance type ...) make a NEW model and
config and then update the endpoint in place (UpdateEndpoint, no downtime;
SageMaker rolls back by itself when the new variant fails its health check).
When auto-scaling is registered, the update keeps the current instance count.

Model data: --model-data S3URI, or --training-job NAME, or by default the
newest completed training job of this deployment (tuning trials included).

The model runs with the role NAME-endpoint (see kennel_ops.aws.endpoint_role),
which deploy creates or updates: it may read the deployed model.tar.gz object
and pull the serving image, nothing else in S3, so a compromised serving
container cannot write the artifacts a later deploy loads. --role-arn runs the
model with another role instead and leaves NAME-endpoint alone.
"""
from __future__ import annotations

import argparse

from kennel_ops.aws.context import Aws, CliError, describe_or_none
from kennel_ops.aws.ecr import newest_image_uri
from kennel_ops.aws.endpoint_role import ensure_endpoint_role, planned_role_arn, role_not_ready, serving_containers
from kennel_ops.aws.iam import retry_while_propagating
from kennel_ops.aws.names import VARIANT, Names
from kennel_ops.aws.s3 import parse_s3_uri
from kennel_ops.aws.training import csv_list, key_value
from kennel_ops.aws.waiting import Poll, wait_for

COMMAND = "deploy"
HELP = "create or update the endpoint NAME (model + endpoint config) and wait until InService"
SETTLING = {"Creating", "Updating", "SystemUpdating", "RollingBack"}
FAILED = {"Failed", "OutOfService", "UpdateRollbackFailed"}


def timeout_s(text: str) -> int:
    value = int(text)
    if not 60 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"between 60 and 3600 seconds, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--image", help="serving image URI (default: the newest image in ECR NAME-serve)")
    source = model.add_mutually_exclusive_group()
    source.add_argument("--model-data", help="s3://.../model.tar.gz")
    source.add_argument("--training-job", help="use this training job's model.tar.gz")
    model.add_argument("--role-arn",
                       help="execution role (default: NAME-endpoint, which deploy keeps to reading the one model)")
    model.add_argument("--env", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                       help="environment variable of the serving container (repeatable)")
    model.add_argument("--subnets", type=csv_list, metavar="ID[,ID]", help="run the endpoint in these VPC subnets")
    model.add_argument("--security-groups", type=csv_list, metavar="ID[,ID]", help="with --subnets")
    model.add_argument("--network-isolation", action="store_true", help="no network access from the container")
    endpoint = parser.add_argument_group("endpoint")
    endpoint.add_argument("--instance-type", default="ml.m5.large", help="(%(default)s, as the original)")
    endpoint.add_argument("--instance-count", type=int, default=1, help="initial instances (%(default)s)")
    endpoint.add_argument("--startup-timeout", type=timeout_s, default=600, metavar="SECONDS",
                          help="ContainerStartupHealthCheckTimeoutInSeconds, 60-3600 (%(default)s)")
    endpoint.add_argument("--download-timeout", type=timeout_s, metavar="SECONDS",
                          help="ModelDataDownloadTimeoutInSeconds, 60-3600 (default: SageMaker's)")
    wait = parser.add_argument_group("waiting")
    wait.add_argument("--no-wait", action="store_true", help="return once the request is accepted")
    wait.add_argument("--poll-seconds", type=float, default=20.0, help="status poll interval (%(default)s)")
    wait.add_argument("--wait-minutes", type=float, default=60.0, help="give up waiting after (%(default)s)")


def resolve_model_data(aws: Aws, args: argparse.Namespace, names: Names) -> str:
    if args.model_data:
        try:
            uri = parse_s3_uri(args.model_data)
        except ValueError as error:
            raise CliError(f"--model-data: {error}") from None
        if not uri.key_prefix.endswith(".tar.gz"):
            raise CliError(f"--model-data must name a model.tar.gz, got {args.model_data}")
        return args.model_data
    sagemaker = aws.client("sagemaker")
    job_name = args.training_job or newest_completed_job(aws, names)
    job = describe_or_none(sagemaker.describe_training_job, TrainingJobName=job_name)
    if job is None:
        raise CliError(f"no training job {job_name}")
    if job["TrainingJobStatus"] != "Completed":
        raise CliError(f"training job {job_name} is {job['TrainingJobStatus']}, not Completed: nothing to deploy")
    aws.console.note(f"model from training job {job_name}")
    return job["ModelArtifacts"]["S3ModelArtifacts"]


def newest_completed_job(aws: Aws, names: Names) -> str:
    paginator = aws.client("sagemaker").get_paginator("list_training_jobs")
    for page in paginator.paginate(NameContains=names.base, StatusEquals="Completed",
                                   SortBy="CreationTime", SortOrder="Descending"):
        for summary in page["TrainingJobSummaries"]:
            if summary["TrainingJobName"].startswith(f"{names.base}-"):
                return summary["TrainingJobName"]
    raise CliError(f"no completed training job named {names.base}-...: pass --model-data or --training-job")


def check_arguments(args: argparse.Namespace) -> None:
    """Flag combinations argparse cannot check, refused before anything is created."""
    if bool(args.subnets) != bool(args.security_groups):
        raise CliError("--subnets and --security-groups go together")
    if args.instance_count < 1:
        raise CliError("--instance-count must be at least 1")


def execution_role(aws: Aws, args: argparse.Namespace, names: Names, endpoint: dict | None,
                   container: dict) -> tuple[str, list[dict]]:
    """The model's execution role ARN, and the containers the endpoint serves with NAME-endpoint now.

    NAME-endpoint is set to read the new container's artifact and, until the
    endpoint has moved to it, the serving ones (see kennel_ops.aws.endpoint_role).
    """
    if args.role_arn:
        return args.role_arn, []
    serving = serving_containers(aws, endpoint, planned_role_arn(aws, names))
    arn = ensure_endpoint_role(aws, names, containers=[container, *serving], vpc=bool(args.subnets))
    return arn, serving


def model_request(aws: Aws, args: argparse.Namespace, names: Names, container: dict, role_arn: str) -> dict:
    container = {**container, "Mode": "SingleModel"}
    if args.env:
        container["Environment"] = dict(args.env)
    content = {"PrimaryContainer": container, "ExecutionRoleArn": role_arn,
               "EnableNetworkIsolation": args.network_isolation}
    if args.subnets:
        content["VpcConfig"] = {"Subnets": args.subnets, "SecurityGroupIds": args.security_groups}
    return {"ModelName": names.model(content), **content, "Tags": aws.tag_list()}


def config_request(aws: Aws, args: argparse.Namespace, names: Names, model_name: str) -> dict:
    variants = [{"VariantName": VARIANT, "ModelName": model_name, "InstanceType": args.instance_type,
                 "InitialInstanceCount": args.instance_count, "InitialVariantWeight": 1.0,
                 "ContainerStartupHealthCheckTimeoutInSeconds": args.startup_timeout}]
    if args.download_timeout:
        variants[0]["ModelDataDownloadTimeoutInSeconds"] = args.download_timeout
    return {"EndpointConfigName": names.endpoint_config(variants), "ProductionVariants": variants,
            "Tags": aws.tag_list()}


def ensure_model(aws: Aws, request: dict) -> None:
    name = request["ModelName"]
    if describe_or_none(aws.client("sagemaker").describe_model, ModelName=name):
        aws.console.note(f"model {name}: exists (same content)")
    else:
        retry_while_propagating(lambda: aws.send("sagemaker", "create_model", **request), aws=aws,
                                what=f"model {name}", is_propagation_error=role_not_ready)
        aws.changed(f"model {name}: created")


def ensure_endpoint_config(aws: Aws, request: dict) -> None:
    name = request["EndpointConfigName"]
    if describe_or_none(aws.client("sagemaker").describe_endpoint_config, EndpointConfigName=name):
        aws.console.note(f"endpoint config {name}: exists (same content)")
    else:
        aws.send("sagemaker", "create_endpoint_config", **request)
        aws.changed(f"endpoint config {name}: created")


def has_scalable_target(aws: Aws, names: Names) -> bool:
    response = aws.client("application-autoscaling").describe_scalable_targets(
        ServiceNamespace="sagemaker", ResourceIds=[names.scaling_resource_id],
        ScalableDimension="sagemaker:variant:DesiredInstanceCount")
    return bool(response["ScalableTargets"])


def refuse_instance_type_change(aws: Aws, current_config: str, instance_type: str) -> None:
    """Application Auto Scaling fails an update that changes an auto-scaled variant's instance type."""
    current = aws.client("sagemaker").describe_endpoint_config(EndpointConfigName=current_config)
    current_type = current["ProductionVariants"][0]["InstanceType"]
    if current_type != instance_type:
        raise CliError(f"the endpoint is auto-scaled on {current_type}: to move to {instance_type}, run "
                       "`kennel-aws autoscale --remove`, deploy, then `kennel-aws autoscale` again")


def run(args: argparse.Namespace) -> None:
    aws = Aws.from_args(args)
    names = Names(args.name)
    check_arguments(args)
    sagemaker = aws.client("sagemaker")
    container = {"Image": args.image or newest_image_uri(aws, names.serve_repository),
                 "ModelDataUrl": resolve_model_data(aws, args, names)}
    endpoint = describe_or_none(sagemaker.describe_endpoint, EndpointName=names.endpoint)
    if endpoint is not None and endpoint["EndpointStatus"] in FAILED:
        raise CliError(f"endpoint {names.endpoint} is {endpoint['EndpointStatus']} "
                       f"({endpoint.get('FailureReason', 'no reason given')}): "
                       "delete it (kennel-aws teardown) and deploy again")
    role_arn, serving = execution_role(aws, args, names, endpoint, container)
    model = model_request(aws, args, names, container, role_arn)
    config = config_request(aws, args, names, model["ModelName"])
    ensure_model(aws, model)
    ensure_endpoint_config(aws, config)
    config_name = config["EndpointConfigName"]
    poll = Poll(interval_s=args.poll_seconds, timeout_s=args.wait_minutes * 60)
    if endpoint is None:
        aws.send("sagemaker", "create_endpoint", EndpointName=names.endpoint, EndpointConfigName=config_name,
                 Tags=aws.tag_list())
        aws.changed(f"endpoint {names.endpoint}: creating with {config_name}")
    elif endpoint["EndpointConfigName"] == config_name:
        aws.console.note(f"endpoint {names.endpoint}: already on {config_name}")
    else:
        if endpoint["EndpointStatus"] in SETTLING and not aws.dry_run:
            wait_in_service(aws, names, poll)  # UpdateEndpoint is refused while an update runs
        retain = has_scalable_target(aws, names)
        if retain:
            refuse_instance_type_change(aws, endpoint["EndpointConfigName"], args.instance_type)
        aws.send("sagemaker", "update_endpoint", EndpointName=names.endpoint, EndpointConfigName=config_name,
                 RetainAllVariantProperties=retain)
        aws.changed(f"endpoint {names.endpoint}: updating from {endpoint['EndpointConfigName']} to {config_name}"
                    + (" (keeping the auto-scaled instance count)" if retain else ""))
    if not (aws.dry_run or args.no_wait):
        final = wait_in_service(aws, names, poll)
        if final["EndpointConfigName"] != config_name:
            if serving and not args.role_arn:  # the old variant serves on: its instances read only its artifact
                ensure_endpoint_role(aws, names, containers=serving, vpc=bool(args.subnets))
            raise CliError(f"endpoint {names.endpoint} rolled back to {final['EndpointConfigName']}: "
                           f"{final.get('FailureReason', 'the new variant did not become healthy')}")
        if not args.role_arn and serving not in ([], [container]):
            ensure_endpoint_role(aws, names, containers=[container], vpc=bool(args.subnets))
    elif not args.role_arn and serving not in ([], [container]):
        aws.console.note(f"role {names.endpoint_role}: also reads the serving model until the next deploy "
                         "after the endpoint is InService")
    aws.console.result(f"endpoint {names.endpoint} {aws.arn('sagemaker', 'endpoint/' + names.endpoint.lower())}")
    aws.console.result(f"config {config_name}")
    aws.console.result(f"model {model['ModelName']}")


def wait_in_service(aws: Aws, names: Names, poll: Poll) -> dict:
    return wait_for(f"endpoint {names.endpoint}",
                    lambda: aws.client("sagemaker").describe_endpoint(EndpointName=names.endpoint),
                    status=lambda d: d["EndpointStatus"], done={"InService"}, failed=FAILED,
                    reason=lambda d: d.get("FailureReason", ""), console=aws.console, poll=poll)
