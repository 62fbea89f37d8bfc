"""Auto-scale the endpoint's variant on SageMakerVariantInvocationsPerInstance.

Registers endpoint/NAME/variant/AllTraffic (sagemaker:variant:DesiredInstanceCount)
as a scalable target and puts a target-tracking policy on it. Defaults are the
original system's: min 1, max 4 instances, target 250 invocations per instance
per minute, scale-in and scale-out cooldown 300 s. --from-report takes the
target from a load-test report (its recommended_invocations_per_instance).
Nothing is sent when target and policy already match; --remove deletes both.

An asynchronous endpoint (deploy --async) scales on its queue instead, from min 0
(see kennel_ops.aws.backlog_scaling): --target is then the backlog per instance
(default 5). A serverless endpoint scales by itself (deploy --max-concurrency).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from kennel_ops.aws import backlog_scaling
from kennel_ops.aws.context import Aws, CliError, describe_or_none
from kennel_ops.aws.deploy import ASYNC, SERVERLESS, config_kind
from kennel_ops.aws.names import Names

COMMAND = "autoscale"
HELP = "auto-scaling of the endpoint (real-time: 250 invocations/instance/min; async: backlog, from zero)"
METRIC = "SageMakerVariantInvocationsPerInstance"
REPORT_FIELD = "recommended_invocations_per_instance"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--min", type=int, dest="min_capacity", help="fewest instances (default 1; async: 0)")
    parser.add_argument("--max", type=int, default=4, dest="max_capacity", help="most instances (%(default)s)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--target", type=float, help="invocations per instance per minute to hold (default 250); "
                        "async: queued requests per instance (default 5)")
    target.add_argument("--from-report", type=Path, metavar="FILE",
                        help=f"take the target from a load-test report JSON ({REPORT_FIELD})")
    parser.add_argument("--scale-in-cooldown", type=int, default=300, metavar="SECONDS", help="(%(default)s)")
    parser.add_argument("--scale-out-cooldown", type=int, default=300, metavar="SECONDS", help="(%(default)s)")
    parser.add_argument("--remove", action="store_true", help="delete the policy and deregister the target")


def target_from_report(path: Path) -> float:
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise CliError(f"no report at {path}") from None
    except json.JSONDecodeError as error:
        raise CliError(f"{path} is not JSON: {error}") from None
    value = report.get(REPORT_FIELD) if isinstance(report, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise CliError(f"{path}: {REPORT_FIELD} must be a positive number, got {value!r}")
    return float(value)


def policy_configuration(target: float, scale_in_cooldown: int, scale_out_cooldown: int) -> dict:
    return {"TargetValue": target,
            "PredefinedMetricSpecification": {"PredefinedMetricType": METRIC},
            "ScaleInCooldown": scale_in_cooldown, "ScaleOutCooldown": scale_out_cooldown,
            "DisableScaleIn": False}


def scalable_target(aws: Aws, names: Names) -> dict | None:
    response = aws.client("application-autoscaling").describe_scalable_targets(
        ServiceNamespace=backlog_scaling.NAMESPACE, ResourceIds=[names.scaling_resource_id],
        ScalableDimension=backlog_scaling.DIMENSION)
    return response["ScalableTargets"][0] if response["ScalableTargets"] else None


def scaling_policy(aws: Aws, names: Names) -> dict | None:
    return backlog_scaling.named_policy(aws, names, names.scaling_policy)


def remove(aws: Aws, names: Names) -> None:
    keys = backlog_scaling.scaling_keys(names)
    backlog_scaling.remove_backlog_policies(aws, names)
    if scaling_policy(aws, names):
        aws.send("application-autoscaling", "delete_scaling_policy", PolicyName=names.scaling_policy, **keys)
        aws.changed(f"scaling policy {names.scaling_policy}: deleted")
    if scalable_target(aws, names):
        aws.send("application-autoscaling", "deregister_scalable_target", **keys)
        aws.changed(f"scalable target {names.scaling_resource_id}: deregistered")


def run(args: argparse.Namespace) -> None:
    aws = Aws.from_args(args)
    names = Names(args.name)
    if args.remove:
        remove(aws, names)
        return
    if args.scale_in_cooldown < 0 or args.scale_out_cooldown < 0:
        raise CliError("cooldowns are seconds, at least 0")
    endpoint = describe_or_none(aws.client("sagemaker").describe_endpoint, EndpointName=names.endpoint)
    if endpoint is None:
        raise CliError(f"no endpoint {names.endpoint}: run `kennel-aws deploy` first")
    if endpoint["EndpointStatus"] != "InService":
        raise CliError(f"endpoint {names.endpoint} is {endpoint['EndpointStatus']}: auto-scaling needs it InService")
    kind = config_kind(aws.client("sagemaker").describe_endpoint_config(
        EndpointConfigName=endpoint["EndpointConfigName"]))
    if kind == SERVERLESS:
        raise CliError(f"endpoint {names.endpoint} is serverless: SageMaker scales it by itself up to its "
                       "--max-concurrency (set with `kennel-aws deploy --serverless`)")
    asynchronous = kind == ASYNC
    if asynchronous and args.from_report:
        raise CliError("--from-report gives invocations per instance; an async endpoint scales on its backlog: "
                       "pass --target")
    lowest = 0 if asynchronous else 1
    args.min_capacity = lowest if args.min_capacity is None else args.min_capacity
    if not lowest <= args.min_capacity <= args.max_capacity:
        raise CliError(f"need {lowest} <= --min ({args.min_capacity}) <= --max ({args.max_capacity})")
    if args.max_capacity < 1:
        raise CliError("--max must be at least 1: an endpoint with no instance to go to answers nothing")
    default_target = backlog_scaling.DEFAULT_BACKLOG_TARGET if asynchronous else 250.0
    target = target_from_report(args.from_report) if args.from_report else (args.target or default_target)
    if target <= 0:
        raise CliError(f"--target must be positive, got {target:g}")

    keys = backlog_scaling.scaling_keys(names)
    current = scalable_target(aws, names)
    if current is None:
        aws.send("application-autoscaling", "register_scalable_target", **keys, MinCapacity=args.min_capacity,
                 MaxCapacity=args.max_capacity, Tags=aws.tag_map())
        aws.changed(f"scalable target {names.scaling_resource_id}: registered")
    elif (current["MinCapacity"], current["MaxCapacity"]) != (args.min_capacity, args.max_capacity):
        aws.send("application-autoscaling", "register_scalable_target", **keys, MinCapacity=args.min_capacity,
                 MaxCapacity=args.max_capacity)
        aws.changed(f"scalable target {names.scaling_resource_id}: min/max updated")
    else:
        aws.console.note(f"scalable target {names.scaling_resource_id}: unchanged")

    if asynchronous:
        backlog_scaling.ensure_backlog_policies(aws, names, target=target, scale_in_cooldown=args.scale_in_cooldown,
                                                scale_out_cooldown=args.scale_out_cooldown)
        aws.console.result(f"autoscale {names.scaling_resource_id} min {args.min_capacity} max {args.max_capacity} "
                           f"target {target:g} {backlog_scaling.BACKLOG_METRIC}")
        return
    backlog_scaling.put_target_tracking(aws, names, names.scaling_policy,
                                        policy_configuration(target, args.scale_in_cooldown, args.scale_out_cooldown))
    aws.console.result(f"autoscale {names.scaling_resource_id} min {args.min_capacity} max {args.max_capacity} "
                       f"target {target:g} {METRIC}")
