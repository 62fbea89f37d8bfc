"""Auto-scale the endpoint's variant on SageMakerVariantInvocationsPerInstance.

Registers endpoint/NAME/variant/AllTraffic (sagemaker:variant:DesiredInstanceCount)
as a scalable target and puts a target-tracking policy on it. Defaults are the
original system's: min 1, max 4 instances, target 250 invocations per instance
per minute, scale-in and scale-out cooldown 300 s. --from-report takes the
target from a load-test report (its recommended_invocations_per_instance).
Nothing is sent when target and policy already match; --remove deletes both.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from kennel_ops.aws.context import Aws, CliError, describe_or_none
from kennel_ops.aws.names import Names

COMMAND = "autoscale"
HELP = "target-tracking auto-scaling of the endpoint (min 1, max 4, 250 invocations/instance/min)"
NAMESPACE = "sagemaker"
DIMENSION = "sagemaker:variant:DesiredInstanceCount"
METRIC = "SageMakerVariantInvocationsPerInstance"
REPORT_FIELD = "recommended_invocations_per_instance"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--min", type=int, default=1, dest="min_capacity", help="fewest instances (%(default)s)")
    parser.add_argument("--max", type=int, default=4, dest="max_capacity", help="most instances (%(default)s)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--target", type=float, help="invocations per instance per minute to hold (default 250)")
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
        ServiceNamespace=NAMESPACE, ResourceIds=[names.scaling_resource_id], ScalableDimension=DIMENSION)
    return response["ScalableTargets"][0] if response["ScalableTargets"] else None


def scaling_policy(aws: Aws, names: Names) -> dict | None:
    response = aws.client("application-autoscaling").describe_scaling_policies(
        PolicyNames=[names.scaling_policy], ServiceNamespace=NAMESPACE, ResourceId=names.scaling_resource_id,
        ScalableDimension=DIMENSION)
    return response["ScalingPolicies"][0] if response["ScalingPolicies"] else None


def remove(aws: Aws, names: Names) -> None:
    keys = {"ServiceNamespace": NAMESPACE, "ResourceId": names.scaling_resource_id, "ScalableDimension": DIMENSION}
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
    if not 1 <= args.min_capacity <= args.max_capacity:
        raise CliError(f"need 1 <= --min ({args.min_capacity}) <= --max ({args.max_capacity})")
    if args.scale_in_cooldown < 0 or args.scale_out_cooldown < 0:
        raise CliError("cooldowns are seconds, at least 0")
    target = target_from_report(args.from_report) if args.from_report else (args.target or 250.0)
    if target <= 0:
        raise CliError(f"--target must be positive, got {target:g}")
    endpoint = describe_or_none(aws.client("sagemaker").describe_endpoint, EndpointName=names.endpoint)
    if endpoint is None:
        raise CliError(f"no endpoint {names.endpoint}: run `kennel-aws deploy` first")
    if endpoint["EndpointStatus"] != "InService":
        raise CliError(f"endpoint {names.endpoint} is {endpoint['EndpointStatus']}: auto-scaling needs it InService")

    keys = {"ServiceNamespace": NAMESPACE, "ResourceId": names.scaling_resource_id, "ScalableDimension": DIMENSION}
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

    wanted = policy_configuration(target, args.scale_in_cooldown, args.scale_out_cooldown)
    policy = scaling_policy(aws, names)
    if policy and same_configuration(policy.get("TargetTrackingScalingPolicyConfiguration", {}), wanted):
        aws.console.note(f"scaling policy {names.scaling_policy}: unchanged")
    else:
        aws.send("application-autoscaling", "put_scaling_policy", PolicyName=names.scaling_policy, **keys,
                 PolicyType="TargetTrackingScaling", TargetTrackingScalingPolicyConfiguration=wanted)
        aws.changed(f"scaling policy {names.scaling_policy}: {'updated' if policy else 'created'}")
    aws.console.result(f"autoscale {names.scaling_resource_id} min {args.min_capacity} max {args.max_capacity} "
                       f"target {target:g} {METRIC}")


def same_configuration(current: dict, wanted: dict) -> bool:
    return all(current.get(key, False if key == "DisableScaleIn" else None) == value for key, value in wanted.items())
