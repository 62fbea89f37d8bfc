"""Delete what the other commands created for deployment NAME, in dependency order:

  auto-scaling policies (an async endpoint's too, and its CloudWatch alarm) and
  scalable target; the dashboard NAME-endpoint; the Lambda function's provisioned
  concurrency, alias `live` and function (all its versions); its role NAME-lambda
  and inline policies; the endpoint NAME (waiting until it is gone); this
  deployment's endpoint configs and models (name NAME-<digest> and tag
  kennel:deployment=NAME); the endpoint's execution role NAME-endpoint; the
  execution role NAME-sagemaker (kept while a training or tuning job of the
  deployment still runs); with
  --delete-images, the ECR repositories NAME-train and NAME-serve and their images.

It lists what it found and asks before deleting (unless --yes). It carries on
past a failed deletion and reports at the end what was deleted, what was
already absent and what is left, exiting non-zero when anything could not be
deleted. Training and tuning jobs (they cannot be deleted and cost nothing),
S3 data and outputs (a multi-model endpoint's models too) and CloudWatch log
groups are left; the report names them.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from typing import Callable

from botocore.exceptions import ClientError

from kennel_ops.aws import autoscale, backlog_scaling
from kennel_ops.aws.context import DEPLOYMENT_TAG, Aws, CliError, describe_or_none, is_not_found
from kennel_ops.aws.names import ALIAS, Names
from kennel_ops.aws.waiting import Poll, wait_for

COMMAND = "teardown"
HELP = "delete the endpoint, scaling, Lambda, roles (and with --delete-images the ECR repositories)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--yes", action="store_true", help="do not ask before deleting")
    parser.add_argument("--delete-images", action="store_true",
                        help="also delete the ECR repositories NAME-train and NAME-serve with every image")
    parser.add_argument("--keep-roles", action="store_true",
                        help="leave NAME-lambda, NAME-endpoint and NAME-sagemaker in place")
    parser.add_argument("--poll-seconds", type=float, default=10.0, help="status poll interval (%(default)s)")


@dataclass
class Step:
    kind: str
    name: str
    delete: Callable[[], None]


def plan(aws: Aws, names: Names, args: argparse.Namespace) -> tuple[list[Step], list[str]]:
    """The deletions to make (in order) and the resources looked for but not found."""
    steps: list[Step] = []
    absent: list[str] = []

    def add(kind: str, name: str, exists: bool, delete: Callable[[], None]) -> None:
        (steps.append(Step(kind, name, delete)) if exists else absent.append(f"{kind} {name}"))

    scaling_keys = backlog_scaling.scaling_keys(names)
    add("alarm", names.wake_alarm, backlog_scaling.wake_alarm(aws, names) is not None,
        lambda: aws.send("cloudwatch", "delete_alarms", AlarmNames=[names.wake_alarm]))
    for policy_name in (names.wake_policy, names.backlog_policy):
        add("scaling policy", policy_name, backlog_scaling.named_policy(aws, names, policy_name) is not None,
            lambda policy_name=policy_name: aws.send("application-autoscaling", "delete_scaling_policy",
                                                     PolicyName=policy_name, **scaling_keys))
    add("scaling policy", names.scaling_policy, autoscale.scaling_policy(aws, names) is not None,
        lambda: aws.send("application-autoscaling", "delete_scaling_policy", PolicyName=names.scaling_policy,
                         **scaling_keys))
    add("scalable target", names.scaling_resource_id, autoscale.scalable_target(aws, names) is not None,
        lambda: aws.send("application-autoscaling", "deregister_scalable_target", **scaling_keys))
    add("dashboard", names.dashboard,
        describe_or_none(aws.client("cloudwatch").get_dashboard, DashboardName=names.dashboard) is not None,
        lambda: aws.send("cloudwatch", "delete_dashboards", DashboardNames=[names.dashboard]))

    lam = aws.client("lambda")
    function = describe_or_none(lam.get_function, FunctionName=names.function)
    alias = describe_or_none(lam.get_alias, FunctionName=names.function, Name=ALIAS) if function else None
    provisioned = (describe_or_none(lam.get_provisioned_concurrency_config, FunctionName=names.function,
                                    Qualifier=ALIAS) if alias else None)
    add("provisioned concurrency", f"{names.function}:{ALIAS}", provisioned is not None,
        lambda: aws.send("lambda", "delete_provisioned_concurrency_config", FunctionName=names.function,
                         Qualifier=ALIAS))
    add("lambda alias", f"{names.function}:{ALIAS}", alias is not None,
        lambda: aws.send("lambda", "delete_alias", FunctionName=names.function, Name=ALIAS))
    add("lambda function", names.function, function is not None,
        lambda: aws.send("lambda", "delete_function", FunctionName=names.function))

    sagemaker = aws.client("sagemaker")
    endpoint = describe_or_none(sagemaker.describe_endpoint, EndpointName=names.endpoint)
    add("endpoint", names.endpoint, endpoint is not None, lambda: delete_endpoint(aws, names, args.poll_seconds))
    for config in deployment_resources(aws, names, "list_endpoint_configs", "EndpointConfigs",
                                       "EndpointConfigName", "EndpointConfigArn"):
        add("endpoint config", config, True,
            lambda config=config: aws.send("sagemaker", "delete_endpoint_config", EndpointConfigName=config))
    for model in deployment_resources(aws, names, "list_models", "Models", "ModelName", "ModelArn"):
        add("model", model, True, lambda model=model: aws.send("sagemaker", "delete_model", ModelName=model))

    if not args.keep_roles:
        running = running_jobs(aws, names)
        for role in (names.lambda_role, names.endpoint_role, names.sagemaker_role):
            if role == names.sagemaker_role and running:
                aws.console.note(f"left: iam role {role}, in use by running jobs {', '.join(running)}")
                continue
            found = describe_or_none(aws.client("iam").get_role, RoleName=role)
            add("iam role", role, found is not None, lambda role=role: delete_role(aws, role))
    if args.delete_images:
        ecr = aws.client("ecr")
        for repository in (names.train_repository, names.serve_repository):
            found = describe_or_none(ecr.describe_repositories, repositoryNames=[repository])
            add("ecr repository", repository, found is not None,
                lambda repository=repository: aws.send("ecr", "delete_repository", repositoryName=repository,
                                                       force=True))
    return steps, absent


def running_jobs(aws: Aws, names: Names) -> list[str]:
    """Training and tuning jobs of this deployment still running (they need the execution role)."""
    sagemaker = aws.client("sagemaker")
    running = []
    for operation, key, name_key in (("list_training_jobs", "TrainingJobSummaries", "TrainingJobName"),
                                     ("list_hyper_parameter_tuning_jobs", "HyperParameterTuningJobSummaries",
                                      "HyperParameterTuningJobName")):
        for page in sagemaker.get_paginator(operation).paginate(NameContains=names.base, StatusEquals="InProgress"):
            running += [item[name_key] for item in page[key] if item[name_key].startswith(f"{names.base}-")]
    return sorted(running)


def deployment_resources(aws: Aws, names: Names, operation: str, key: str, name_key: str,
                         arn_key: str) -> list[str]:
    """Names of the models / endpoint configs this deployment made: NAME-<digest>, tagged with NAME."""
    pattern = re.compile(rf"^{re.escape(names.base)}-[0-9a-f]{{10}}$")
    sagemaker = aws.client("sagemaker")
    found = []
    for page in sagemaker.get_paginator(operation).paginate(NameContains=names.base):
        for item in page[key]:
            if pattern.match(item[name_key]) and tagged_for(aws, item[arn_key], names.base):
                found.append(item[name_key])
    return sorted(found)


def tagged_for(aws: Aws, arn: str, base: str) -> bool:
    tags = aws.client("sagemaker").list_tags(ResourceArn=arn).get("Tags", [])
    return any(tag["Key"] == DEPLOYMENT_TAG and tag["Value"] == base for tag in tags)


def delete_endpoint(aws: Aws, names: Names, poll_seconds: float) -> None:
    aws.send("sagemaker", "delete_endpoint", EndpointName=names.endpoint)
    if aws.dry_run:
        return
    sagemaker = aws.client("sagemaker")

    def describe() -> dict:
        return describe_or_none(sagemaker.describe_endpoint, EndpointName=names.endpoint) or {"EndpointStatus": "gone"}

    wait_for(f"endpoint {names.endpoint}", describe, status=lambda d: d["EndpointStatus"], done={"gone"},
             failed={"Failed"}, reason=lambda d: d.get("FailureReason", ""), console=aws.console,
             poll=Poll(interval_s=poll_seconds, timeout_s=1800))


def delete_role(aws: Aws, role: str) -> None:
    iam = aws.client("iam")
    for page in iam.get_paginator("list_role_policies").paginate(RoleName=role):
        for policy in page["PolicyNames"]:
            aws.send("iam", "delete_role_policy", RoleName=role, PolicyName=policy)
    for page in iam.get_paginator("list_attached_role_policies").paginate(RoleName=role):
        for policy in page["AttachedPolicies"]:
            aws.send("iam", "detach_role_policy", RoleName=role, PolicyArn=policy["PolicyArn"])
    aws.send("iam", "delete_role", RoleName=role)


def confirm(steps: list[Step], args: argparse.Namespace) -> None:
    if args.yes or args.dry_run:
        return
    if not sys.stdin.isatty():
        raise CliError(f"{len(steps)} resources to delete; not asking on a non-interactive stdin: pass --yes")
    answer = input(f"delete these {len(steps)} resources? [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        raise CliError("nothing deleted")


def execute(aws: Aws, steps: list[Step]) -> list[str]:
    """Run the deletions in order, past failures; returns the labels that could not be deleted."""
    failed = []
    for step in steps:
        label = f"{step.kind} {step.name}"
        try:
            step.delete()
        except ClientError as error:
            if is_not_found(error):
                aws.console.note(f"already gone: {label}")
                continue
            info = error.response.get("Error", {})
            failed.append(label)
            aws.console.note(f"could not delete {label}: {info.get('Code')}: {info.get('Message')}")
            continue
        if not aws.dry_run:
            aws.console.result(f"deleted {label}")
    return failed


def run(args: argparse.Namespace) -> None:
    aws = Aws.from_args(args)
    names = Names(args.name)
    steps, absent = plan(aws, names, args)
    for label in absent:
        aws.console.note(f"absent: {label}")
    if not steps:
        aws.console.result(f"nothing to delete for deployment {names.base}")
        report_left(aws, names, args)
        return
    aws.console.note(f"deployment {names.base} in {aws.region}, to delete:")
    for step in steps:
        aws.console.note(f"  {step.kind} {step.name}")
    confirm(steps, args)
    failed = execute(aws, steps)
    report_left(aws, names, args)
    if failed:
        raise CliError(f"teardown left {len(failed)} resources: {', '.join(failed)}")


def report_left(aws: Aws, names: Names, args: argparse.Namespace) -> None:
    left = [f"CloudWatch log groups /aws/lambda/{names.function} and /aws/sagemaker/Endpoints/{names.endpoint}",
            f"training and tuning jobs {names.base}-* (records only, no cost)",
            "S3 data and outputs (models/, checkpoints/, tensorboard/ under the --output prefix; "
            "an async endpoint's inputs/, outputs/ and failures/; a multi-model endpoint's models)"]
    if not args.delete_images:
        left.append(f"ECR repositories {names.train_repository}, {names.serve_repository} (--delete-images)")
    if args.keep_roles:
        left.append(f"IAM roles {names.lambda_role}, {names.endpoint_role}, {names.sagemaker_role}")
    for item in left:
        aws.console.note(f"left: {item}")
