"""Deploy a trained model to the endpoint NAME with the kennel-serve image.

Three kinds of hosting (docs/serving.md, "Choosing a hosting option"):
  real-time (default)  instances behind InvokeEndpoint: --instance-type, --instance-count;
  --serverless         no instances to run: --memory-size, --max-concurrency,
                       --provisioned-concurrency (CPU only, 4 MB requests, cold starts);
  --async              instances behind InvokeEndpointAsync, requests and answers in S3
                       under --output (see kennel_ops.aws.async_layout), optional SNS
                       topics; `kennel-aws autoscale` can then take it to zero instances.
SageMaker cannot turn an endpoint of one kind into another: deploy refuses, and says so.

--multi-model s3://BUCKET/PREFIX/ makes a real-time endpoint serve every model
under PREFIX (Mode MultiModel; `kennel-aws add-model` puts them there): a
request names one with InvokeEndpoint's TargetModel, and SageMaker loads it on
first use and keeps it while there is room. --model-cache disabled keeps none
loaded for the next request (for many models, each asked rarely). SageMaker has
no serverless multi-model endpoints, and InvokeEndpointAsync names no target
model: deploy refuses both.

Model and endpoint config are immutable in SageMaker, so their names carry a
digest of their content: deploying the same inputs again changes nothing, and
different inputs (a new model, image, instance type ...) make a NEW model and
config and then update the endpoint in place (UpdateEndpoint, no downtime;
SageMaker rolls back by itself when the new variant fails its health check).
When auto-scaling is registered, the update keeps the current instance count.

Model data: --model-data S3URI, or --training-job NAME, or --multi-model S3URI,
or by default the newest completed training job of this deployment (tuning
trials included).

The model runs with the role NAME-endpoint (see kennel_ops.aws.endpoint_role),
which deploy creates or updates: it may read the deployed model.tar.gz object
(or the objects under the --multi-model prefix) and pull the serving image,
nothing else in S3, so a compromised serving container cannot write the
artifacts a later deploy loads. --role-arn runs the
model with another role instead and leaves NAME-endpoint alone.
"""
from __future__ import annotations

import argparse

from kennel_ops.aws.async_layout import AsyncLayout, layout_from_flag, topic_arn
from kennel_ops.aws.arguments import argument_type
from kennel_ops.aws.context import Aws, CliError, describe_or_none
from kennel_ops.aws.ecr import newest_image_uri
from kennel_ops.aws.endpoint_role import (MULTI_MODEL, SINGLE_MODEL, ensure_endpoint_role, planned_role_arn,
                                          role_not_ready, serving_async_configs, serving_containers)
from kennel_ops.aws.iam import retry_while_propagating
from kennel_ops.aws.names import VARIANT, Names
from kennel_ops.aws.s3 import models_prefix_type, parse_s3_uri
from kennel_ops.aws.training import csv_list, key_value
from kennel_ops.aws.waiting import Poll, wait_for

COMMAND = "deploy"
HELP = "create or update the endpoint NAME (model + endpoint config) and wait until InService"
SETTLING = {"Creating", "Updating", "SystemUpdating", "RollingBack"}
FAILED = {"Failed", "OutOfService", "UpdateRollbackFailed"}
REAL_TIME, SERVERLESS, ASYNC = "real-time", "serverless", "async"
SERVERLESS_MEMORY_MB = range(1024, 6145, 1024)
MODEL_CACHE = {"enabled": "Enabled", "disabled": "Disabled"}  # --model-cache -> ModelCacheSetting
# The serving container's settings an async endpoint needs (a user's --env wins): bodies up to
# the size whose parsing stays inside the per-request memory budget (docs/benchmarks.md,
# "Async request bodies"), as many images as such a body holds, and MMS's timeout raised to
# InvokeEndpointAsync's default InvocationTimeoutSeconds, so a long jsonlines file is not cut off.
ASYNC_ENV = {"SAGEMAKER_MAX_PAYLOAD_IN_MB": "20", "KENNEL_MAX_IMAGES": "128",
             "SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS": "900"}


def memory_mb(text: str) -> int:
    value = int(text)
    if value not in SERVERLESS_MEMORY_MB:
        raise argparse.ArgumentTypeError(f"1024 to 6144 in steps of 1024, got {value}")
    return value


def bounded(low: int, high: int):
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"between {low} and {high}, got {value}")
        return value
    return parse


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
    source.add_argument("--multi-model", type=models_prefix_type, metavar="S3URI",
                        help="s3://BUCKET/PREFIX/: a multi-model endpoint serving every model there "
                             "(add them with `kennel-aws add-model`)")
    model.add_argument("--model-cache", choices=sorted(MODEL_CACHE),
                       help="with --multi-model: keep loaded models for later requests (default enabled)")
    model.add_argument("--role-arn",
                       help="execution role (default: NAME-endpoint, which deploy keeps to reading the one model)")
    model.add_argument("--env", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                       help="environment variable of the serving container (repeatable)")
    model.add_argument("--subnets", type=csv_list, metavar="ID[,ID]", help="run the endpoint in these VPC subnets")
    model.add_argument("--security-groups", type=csv_list, metavar="ID[,ID]", help="with --subnets")
    model.add_argument("--network-isolation", action="store_true", help="no network access from the container")
    endpoint = parser.add_argument_group("endpoint (real-time and async)")
    endpoint.add_argument("--instance-type", help="(default ml.m5.large, as the original)")
    endpoint.add_argument("--instance-count", type=int, help="initial instances (default 1)")
    endpoint.add_argument("--startup-timeout", type=timeout_s, metavar="SECONDS",
                          help="ContainerStartupHealthCheckTimeoutInSeconds, 60-3600 (default 600)")
    endpoint.add_argument("--download-timeout", type=timeout_s, metavar="SECONDS",
                          help="ModelDataDownloadTimeoutInSeconds, 60-3600 (default: SageMaker's)")
    kind = parser.add_argument_group("serverless or asynchronous (default: real-time)")
    kinds = kind.add_mutually_exclusive_group()
    kinds.add_argument("--serverless", action="store_true", help="a serverless endpoint (no instances)")
    kinds.add_argument("--async", dest="asynchronous", action="store_true",
                       help="an asynchronous endpoint (requests and answers in S3 under --output)")
    kind.add_argument("--memory-size", type=memory_mb, metavar="MB",
                      help="serverless: 1024-6144 in steps of 1024 (default 2048, docs/benchmarks.md)")
    kind.add_argument("--max-concurrency", type=bounded(1, 200), metavar="N",
                      help="serverless: concurrent invocations, 1-200 (default 5)")
    kind.add_argument("--provisioned-concurrency", type=bounded(1, 200), metavar="N",
                      help="serverless: invocations kept warm, at most --max-concurrency (default none)")
    kind.add_argument("--output", metavar="S3URI",
                      help="async: s3://BUCKET/PREFIX/ for inputs/, outputs/ and failures/ (required with --async)")
    kind.add_argument("--success-topic", type=topic_arn_type, metavar="ARN", help="async: SNS topic told of answers")
    kind.add_argument("--error-topic", type=topic_arn_type, metavar="ARN", help="async: SNS topic told of failures")
    kind.add_argument("--max-concurrent-invocations", type=bounded(1, 1000), metavar="N",
                      help="async: requests each instance takes at once, 1-1000 (default: SageMaker's)")
    wait = parser.add_argument_group("waiting")
    wait.add_argument("--no-wait", action="store_true", help="return once the request is accepted")
    wait.add_argument("--poll-seconds", type=float, default=20.0, help="status poll interval (%(default)s)")
    wait.add_argument("--wait-minutes", type=float, default=60.0, help="give up waiting after (%(default)s)")


topic_arn_type = argument_type(topic_arn, errors=(CliError,))


def hosting_kind(args: argparse.Namespace) -> str:
    return SERVERLESS if args.serverless else ASYNC if args.asynchronous else REAL_TIME


def config_kind(config: dict) -> str:
    """The kind of an existing endpoint config (DescribeEndpointConfig)."""
    if config.get("AsyncInferenceConfig"):
        return ASYNC
    return SERVERLESS if any("ServerlessConfig" in v for v in config.get("ProductionVariants", [])) else REAL_TIME


def resolve_model_data(aws: Aws, args: argparse.Namespace, names: Names) -> str:
    if args.multi_model:
        return str(args.multi_model)
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
    """Flag combinations argparse cannot check, refused before anything is created; fills in the defaults."""
    if bool(args.subnets) != bool(args.security_groups):
        raise CliError("--subnets and --security-groups go together")
    kind = hosting_kind(args)
    if args.multi_model and kind != REAL_TIME:
        why = {SERVERLESS: "SageMaker has no serverless multi-model endpoints",
               ASYNC: "InvokeEndpointAsync cannot name a target model"}[kind]
        raise CliError(f"--multi-model cannot go with --{kind}: {why}")
    if args.model_cache and not args.multi_model:
        raise CliError("--model-cache goes with --multi-model")
    args.model_cache = args.model_cache or "enabled"
    given = {flag for flag, value in (
        ("--instance-type", args.instance_type), ("--instance-count", args.instance_count),
        ("--startup-timeout", args.startup_timeout), ("--download-timeout", args.download_timeout),
        ("--subnets", args.subnets), ("--network-isolation", args.network_isolation or None),
        ("--memory-size", args.memory_size), ("--max-concurrency", args.max_concurrency),
        ("--provisioned-concurrency", args.provisioned_concurrency), ("--output", args.output),
        ("--success-topic", args.success_topic), ("--error-topic", args.error_topic),
        ("--max-concurrent-invocations", args.max_concurrent_invocations)) if value is not None}
    only = {SERVERLESS: {"--memory-size", "--max-concurrency", "--provisioned-concurrency"},
            ASYNC: {"--output", "--success-topic", "--error-topic", "--max-concurrent-invocations"}}
    # Serverless endpoints run no instances, in no VPC, without network isolation or startup timeouts.
    not_serverless = {"--instance-type", "--instance-count", "--startup-timeout", "--download-timeout", "--subnets",
                      "--network-isolation"}
    refused = given & ((only[SERVERLESS] | only[ASYNC]) - only.get(kind, set()))
    if kind == SERVERLESS:
        refused |= given & not_serverless
    if refused:
        what = {SERVERLESS: "--serverless", ASYNC: "--async", REAL_TIME: "a real-time endpoint"}[kind]
        needs = "" if kind != REAL_TIME else " (they need --serverless or --async)"
        raise CliError(f"{', '.join(sorted(refused))} cannot go with {what}{needs}")
    if kind == SERVERLESS:
        # The smallest size that holds a request at the full per-request budget with room to spare
        # (docs/benchmarks.md, "Serverless memory sizes").
        args.memory_size = args.memory_size or 2048
        args.max_concurrency = args.max_concurrency or 5
        if args.provisioned_concurrency and args.provisioned_concurrency > args.max_concurrency:
            raise CliError(f"--provisioned-concurrency {args.provisioned_concurrency} is more than "
                           f"--max-concurrency {args.max_concurrency}")
        return
    if kind == ASYNC:
        if not args.output:
            raise CliError("--async needs --output s3://BUCKET/PREFIX/ (where requests and answers go)")
        args.async_layout = layout_from_flag(args.output)
    args.instance_type = args.instance_type or "ml.m5.large"
    args.instance_count = 1 if args.instance_count is None else args.instance_count
    args.startup_timeout = args.startup_timeout or 600
    if args.instance_count < 1:
        raise CliError("--instance-count must be at least 1")


def execution_role(aws: Aws, args: argparse.Namespace, names: Names, endpoint: dict | None,
                   container: dict) -> tuple[str, list[dict], list[dict]]:
    """The model's execution role ARN, and the containers and async configs the endpoint serves with now.

    NAME-endpoint is set to read the new container's artifact and, until the
    endpoint has moved to it, the serving ones (see kennel_ops.aws.endpoint_role);
    likewise the async folders and topics of the new and the serving config.
    """
    if args.role_arn:
        return args.role_arn, [], []
    serving = serving_containers(aws, endpoint, planned_role_arn(aws, names))
    serving_async = serving_async_configs(aws, endpoint)
    new_async = [async_config(args)] if args.asynchronous else []
    arn = ensure_endpoint_role(aws, names, containers=[container, *serving], vpc=bool(args.subnets),
                               async_configs=unique([*new_async, *serving_async]))
    return arn, serving, serving_async


def unique(items: list[dict]) -> list[dict]:
    return [item for index, item in enumerate(items) if item not in items[:index]]


def async_config(args: argparse.Namespace) -> dict:
    layout: AsyncLayout = args.async_layout
    output = {"S3OutputPath": str(layout.outputs), "S3FailurePath": str(layout.failures)}
    topics = {key: value for key, value in (("SuccessTopic", args.success_topic), ("ErrorTopic", args.error_topic))
              if value}
    if topics:
        output["NotificationConfig"] = topics
    config = {"OutputConfig": output}
    if args.max_concurrent_invocations:
        config["ClientConfig"] = {"MaxConcurrentInvocationsPerInstance": args.max_concurrent_invocations}
    return config


def model_request(aws: Aws, args: argparse.Namespace, names: Names, container: dict, role_arn: str) -> dict:
    container = dict(container)
    if container["Mode"] == MULTI_MODEL:
        container["MultiModelConfig"] = {"ModelCacheSetting": MODEL_CACHE[args.model_cache]}
    environment = {**(ASYNC_ENV if args.asynchronous else {}), **dict(args.env)}
    if environment:
        container["Environment"] = environment
    content = {"PrimaryContainer": container, "ExecutionRoleArn": role_arn,
               "EnableNetworkIsolation": args.network_isolation}
    if args.subnets:
        content["VpcConfig"] = {"Subnets": args.subnets, "SecurityGroupIds": args.security_groups}
    return {"ModelName": names.model(content), **content, "Tags": aws.tag_list()}


def config_request(aws: Aws, args: argparse.Namespace, names: Names, model_name: str) -> dict:
    variant = {"VariantName": VARIANT, "ModelName": model_name}
    if args.serverless:
        serverless = {"MemorySizeInMB": args.memory_size, "MaxConcurrency": args.max_concurrency}
        if args.provisioned_concurrency:
            serverless["ProvisionedConcurrency"] = args.provisioned_concurrency
        variant["ServerlessConfig"] = serverless
    else:
        variant.update({"InstanceType": args.instance_type, "InitialInstanceCount": args.instance_count,
                        "InitialVariantWeight": 1.0,
                        "ContainerStartupHealthCheckTimeoutInSeconds": args.startup_timeout})
        if args.download_timeout:
            variant["ModelDataDownloadTimeoutInSeconds"] = args.download_timeout
    content = {"ProductionVariants": [variant]}
    if args.asynchronous:
        content["AsyncInferenceConfig"] = async_config(args)
    # The digest covers the variants alone when there is nothing else, so the names of
    # real-time configs made before async existed stay the same.
    digest_of = content if args.asynchronous else content["ProductionVariants"]
    return {"EndpointConfigName": names.endpoint_config(digest_of), **content, "Tags": aws.tag_list()}


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


def refuse_kind_change(aws: Aws, names: Names, endpoint: dict, kind: str) -> None:
    """SageMaker refuses UpdateEndpoint between real-time, serverless and async configs."""
    current = aws.client("sagemaker").describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    current_kind = config_kind(current)
    if current_kind != kind:
        raise CliError(f"endpoint {names.endpoint} is {current_kind}, and SageMaker cannot change an endpoint to "
                       f"{kind} in place: run `kennel-aws teardown` first, or deploy under another --name")


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
                 "ModelDataUrl": resolve_model_data(aws, args, names),
                 "Mode": MULTI_MODEL if args.multi_model else SINGLE_MODEL}
    endpoint = describe_or_none(sagemaker.describe_endpoint, EndpointName=names.endpoint)
    if endpoint is not None and endpoint["EndpointStatus"] in FAILED:
        raise CliError(f"endpoint {names.endpoint} is {endpoint['EndpointStatus']} "
                       f"({endpoint.get('FailureReason', 'no reason given')}): "
                       "delete it (kennel-aws teardown) and deploy again")
    if endpoint is not None:
        refuse_kind_change(aws, names, endpoint, hosting_kind(args))
    role_arn, serving, serving_async = execution_role(aws, args, names, endpoint, container)
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
        if retain and not args.serverless:
            refuse_instance_type_change(aws, endpoint["EndpointConfigName"], args.instance_type)
        aws.send("sagemaker", "update_endpoint", EndpointName=names.endpoint, EndpointConfigName=config_name,
                 RetainAllVariantProperties=retain)
        aws.changed(f"endpoint {names.endpoint}: updating from {endpoint['EndpointConfigName']} to {config_name}"
                    + (" (keeping the auto-scaled instance count)" if retain else ""))
    new_async = [config["AsyncInferenceConfig"]] if args.asynchronous else []
    narrower = serving not in ([], [container]) or unique([*new_async, *serving_async]) != new_async
    if not (aws.dry_run or args.no_wait):
        final = wait_in_service(aws, names, poll)
        if final["EndpointConfigName"] != config_name:
            if serving and not args.role_arn:  # the old variant serves on: its instances read only its artifact
                ensure_endpoint_role(aws, names, containers=serving, vpc=bool(args.subnets),
                                     async_configs=serving_async)
            raise CliError(f"endpoint {names.endpoint} rolled back to {final['EndpointConfigName']}: "
                           f"{final.get('FailureReason', 'the new variant did not become healthy')}")
        if not args.role_arn and endpoint is not None and narrower:
            ensure_endpoint_role(aws, names, containers=[container], vpc=bool(args.subnets), async_configs=new_async)
    elif not args.role_arn and endpoint is not None and narrower:
        aws.console.note(f"role {names.endpoint_role}: also reads the serving model until the next deploy "
                         "after the endpoint is InService")
    aws.console.result(f"endpoint {names.endpoint} {aws.arn('sagemaker', 'endpoint/' + names.endpoint.lower())}")
    aws.console.result(f"config {config_name}")
    aws.console.result(f"model {model['ModelName']}")
    if args.asynchronous:
        aws.console.result(f"async {args.async_layout.root}")
    if args.multi_model:
        aws.console.result(f"models {args.multi_model}")


def wait_in_service(aws: Aws, names: Names, poll: Poll) -> dict:
    return wait_for(f"endpoint {names.endpoint}",
                    lambda: aws.client("sagemaker").describe_endpoint(EndpointName=names.endpoint),
                    status=lambda d: d["EndpointStatus"], done={"InService"}, failed=FAILED,
                    reason=lambda d: d.get("FailureReason", ""), console=aws.console, poll=poll)
