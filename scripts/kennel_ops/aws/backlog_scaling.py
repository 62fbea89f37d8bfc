"""Auto-scaling of an asynchronous endpoint on its queue, down to zero instances and back.

Two policies on the variant's DesiredInstanceCount, as AWS's async inference guide sets them:

  NAME-backlog-per-instance   target tracking on ApproximateBacklogSizePerInstance (requests
                              queued per instance): holds the backlog near --target (default 5);
  NAME-scale-from-zero        a step of +1 instance, run by the CloudWatch alarm
                              NAME-has-backlog-without-capacity (HasBacklogWithoutCapacity >= 1
                              for 2 minutes): target tracking cannot leave zero instances by
                              itself, since a metric per instance has no value without instances.
"""
from __future__ import annotations

from kennel_ops.aws.context import Aws
from kennel_ops.aws.names import Names

NAMESPACE = "sagemaker"
DIMENSION = "sagemaker:variant:DesiredInstanceCount"
METRICS_NAMESPACE = "AWS/SageMaker"
BACKLOG_METRIC = "ApproximateBacklogSizePerInstance"
WAKE_METRIC = "HasBacklogWithoutCapacity"
DEFAULT_BACKLOG_TARGET = 5.0


def scaling_keys(names: Names) -> dict:
    return {"ServiceNamespace": NAMESPACE, "ResourceId": names.scaling_resource_id, "ScalableDimension": DIMENSION}


def named_policy(aws: Aws, names: Names, policy_name: str) -> dict | None:
    """The variant's scaling policy of that name, or None (matched by name here too: moto ignores PolicyNames)."""
    response = aws.client("application-autoscaling").describe_scaling_policies(
        PolicyNames=[policy_name], **scaling_keys(names))
    return next((policy for policy in response["ScalingPolicies"] if policy["PolicyName"] == policy_name), None)


def wake_alarm(aws: Aws, names: Names) -> dict | None:
    alarms = aws.client("cloudwatch").describe_alarms(AlarmNames=[names.wake_alarm])["MetricAlarms"]
    return alarms[0] if alarms else None


def backlog_configuration(names: Names, target: float, scale_in_cooldown: int, scale_out_cooldown: int) -> dict:
    return {"TargetValue": target,
            "CustomizedMetricSpecification": {
                "MetricName": BACKLOG_METRIC, "Namespace": METRICS_NAMESPACE, "Statistic": "Average",
                "Dimensions": [{"Name": "EndpointName", "Value": names.endpoint}]},
            "ScaleInCooldown": scale_in_cooldown, "ScaleOutCooldown": scale_out_cooldown, "DisableScaleIn": False}


def wake_configuration(scale_out_cooldown: int) -> dict:
    return {"AdjustmentType": "ChangeInCapacity", "MetricAggregationType": "Average",
            "Cooldown": scale_out_cooldown,
            "StepAdjustments": [{"MetricIntervalLowerBound": 0.0, "ScalingAdjustment": 1}]}


def alarm_request(aws: Aws, names: Names, policy_arn: str) -> dict:
    return {"AlarmName": names.wake_alarm,
            "AlarmDescription": f"kennel {names.base}: requests wait and endpoint {names.endpoint} has no instance",
            "MetricName": WAKE_METRIC, "Namespace": METRICS_NAMESPACE, "Statistic": "Average",
            "Dimensions": [{"Name": "EndpointName", "Value": names.endpoint}],
            "Period": 60, "EvaluationPeriods": 2, "DatapointsToAlarm": 2, "Threshold": 1.0,
            "ComparisonOperator": "GreaterThanOrEqualToThreshold", "TreatMissingData": "missing",
            "AlarmActions": [policy_arn]}


def same(current: dict, wanted: dict) -> bool:
    return all(current.get(key) == value for key, value in wanted.items())


def put_target_tracking(aws: Aws, names: Names, policy_name: str, wanted: dict) -> None:
    """The variant's target-tracking policy `policy_name` as `wanted`, sent only when it differs
    (DisableScaleIn absent reads as AWS's default, false)."""
    policy = named_policy(aws, names, policy_name)
    current = (policy or {}).get("TargetTrackingScalingPolicyConfiguration", {})
    if policy and all(current.get(key, False if key == "DisableScaleIn" else None) == value
                      for key, value in wanted.items()):
        aws.console.note(f"scaling policy {policy_name}: unchanged")
        return
    aws.send("application-autoscaling", "put_scaling_policy", PolicyName=policy_name, **scaling_keys(names),
             PolicyType="TargetTrackingScaling", TargetTrackingScalingPolicyConfiguration=wanted)
    aws.changed(f"scaling policy {policy_name}: {'updated' if policy else 'created'}")


def ensure_backlog_policies(aws: Aws, names: Names, *, target: float, scale_in_cooldown: int,
                            scale_out_cooldown: int) -> None:
    """The two policies and the alarm, each sent only when it differs from what exists."""
    keys = scaling_keys(names)
    put_target_tracking(aws, names, names.backlog_policy,
                        backlog_configuration(names, target, scale_in_cooldown, scale_out_cooldown))

    wanted = wake_configuration(scale_out_cooldown)
    policy = named_policy(aws, names, names.wake_policy)
    policy_arn = policy["PolicyARN"] if policy else None
    if policy and same(policy.get("StepScalingPolicyConfiguration", {}), wanted):
        aws.console.note(f"scaling policy {names.wake_policy}: unchanged")
    else:
        response = aws.send("application-autoscaling", "put_scaling_policy", PolicyName=names.wake_policy, **keys,
                            PolicyType="StepScaling", StepScalingPolicyConfiguration=wanted)
        policy_arn = response["PolicyARN"] if response else policy_arn
        aws.changed(f"scaling policy {names.wake_policy}: {'updated' if policy else 'created'}")

    # Under --dry-run a new policy has no ARN yet: the printed alarm names where it goes.
    request = alarm_request(aws, names, policy_arn or f"<PolicyARN of {names.wake_policy}>")
    alarm = wake_alarm(aws, names)
    if alarm and same(alarm, {key: value for key, value in request.items() if key != "AlarmDescription"}):
        aws.console.note(f"alarm {names.wake_alarm}: unchanged")
    else:
        aws.send("cloudwatch", "put_metric_alarm", **request, Tags=aws.tag_list())
        aws.changed(f"alarm {names.wake_alarm}: {'updated' if alarm else 'created'}")


def remove_backlog_policies(aws: Aws, names: Names) -> None:
    if wake_alarm(aws, names):
        aws.send("cloudwatch", "delete_alarms", AlarmNames=[names.wake_alarm])
        aws.changed(f"alarm {names.wake_alarm}: deleted")
    for policy_name in (names.wake_policy, names.backlog_policy):
        if named_policy(aws, names, policy_name):
            aws.send("application-autoscaling", "delete_scaling_policy", PolicyName=policy_name,
                     **scaling_keys(names))
            aws.changed(f"scaling policy {policy_name}: deleted")
