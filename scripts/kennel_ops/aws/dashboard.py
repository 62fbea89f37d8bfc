"""A CloudWatch dashboard for the endpoint: what a user opens to see it serve.

Latency percentiles (ModelLatency p50/p90/p99 and OverheadLatency p99, in ms),
invocations per instance per minute against the auto-scaling target (the
SageMakerVariantInvocationsPerInstance target of `kennel-aws autoscale`, or
--target), the instances in service, 4xx/5xx errors, the instances' CPU and
memory, and the serving stages the container publishes as CloudWatch embedded
metrics (kennel_serve.metrics: namespace kennel/Endpoint, dimension Model, one
<Stage>Time metric in ms per stage, found by SEARCH whatever the model's name). Nothing is sent when
the dashboard already matches; --remove deletes it. Locally, the load test's
latency-vs-throughput plot shows the same curve (docs/capacity.md).
"""
from __future__ import annotations

import argparse
import json
from typing import Any

from kennel_ops.aws.autoscale import scaling_policy
from kennel_ops.aws.context import Aws, CliError, describe_or_none
from kennel_ops.aws.names import VARIANT, Names
from kennel_serve.metrics import EMF_NAMESPACE, STAGE_METRICS, STAGES

COMMAND = "dashboard"
HELP = "a CloudWatch dashboard of the endpoint: latency, invocations per instance vs target, instances, errors, stages"
GRAPH_PERIOD_S = 60
# The serving container's EMF metrics (docs/serving.md, Observability), named where they are made.
STAGE_DIMENSION = "Model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", type=float, metavar="INVOCATIONS",
                        help="the line on the invocations-per-instance graph (default: the auto-scaling "
                             "policy's target, none when there is no policy)")
    parser.add_argument("--remove", action="store_true", help="delete the dashboard")


def endpoint_metric(metric: str, endpoint: str, options: dict[str, Any],
                    namespace: str = "AWS/SageMaker") -> list[Any]:
    return [namespace, metric, "EndpointName", endpoint, "VariantName", VARIANT, options]


def widget(title: str, metrics: list[list[Any]], region: str, x: int, y: int, *, stat: str = "Sum",
           label: str = "", annotations: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    properties: dict[str, Any] = {"title": title, "region": region, "metrics": metrics, "view": "timeSeries",
                                  "stacked": False, "period": GRAPH_PERIOD_S, "stat": stat,
                                  "yAxis": {"left": {"min": 0, "label": label, "showUnits": False}}}
    if annotations:
        properties["annotations"] = {"horizontal": annotations}
    return {"type": "metric", "x": x, "y": y, "width": 12, "height": 6, "properties": properties}


def dashboard_body(endpoint: str, region: str, target: float | None) -> dict[str, Any]:
    """The dashboard's JSON (CloudWatch's dashboard body structure)."""
    latency = []
    for i, (metric, stat) in enumerate((("ModelLatency", "p50"), ("ModelLatency", "p90"), ("ModelLatency", "p99"),
                                        ("OverheadLatency", "p99"))):
        latency.append([{"expression": f"m{i} / 1000", "label": f"{metric} {stat}", "id": f"ms{i}"}])
        latency.append(endpoint_metric(metric, endpoint, {"stat": stat, "id": f"m{i}", "visible": False}))
    per_instance = [endpoint_metric("InvocationsPerInstance", endpoint, {"label": "invocations per instance"})]
    line = ([{"label": f"auto-scaling target {target:g}", "value": target}] if target is not None else None)
    instances = [
        [{"expression": "invocations / per_instance", "label": "instances (Invocations / InvocationsPerInstance)",
          "id": "instances"}],
        endpoint_metric("Invocations", endpoint, {"id": "invocations", "visible": False}),
        endpoint_metric("InvocationsPerInstance", endpoint, {"id": "per_instance", "visible": False}),
    ]
    errors = [endpoint_metric(name, endpoint, {"label": name}) for name in
              ("Invocation4XXErrors", "Invocation5XXErrors", "InvocationModelErrors")]
    usage = [endpoint_metric(name, endpoint, {"label": f"{name} (100 = one core)" if name == "CPUUtilization"
                                              else name}, namespace="/aws/sagemaker/Endpoints")
             for name in ("CPUUtilization", "MemoryUtilization")]
    stages = [[{"expression": f"SEARCH('{{{EMF_NAMESPACE},{STAGE_DIMENSION}}} "
                              f"MetricName=\"{STAGE_METRICS[stage]}\"', 'p50', {GRAPH_PERIOD_S})",
                "label": f"{stage} p50", "id": f"stage{i}"}] for i, stage in enumerate(STAGES)]
    return {"widgets": [
        widget(f"{endpoint}: latency percentiles (ms)", latency, region, 0, 0, stat="p99", label="ms"),
        widget("invocations per instance per minute, against the scaling target", per_instance, region, 12, 0,
               label="per minute", annotations=line),
        widget("instances in service", instances, region, 0, 6, label="instances"),
        widget("errors per minute", errors, region, 12, 6, label="per minute"),
        widget("instances' CPU and memory (%)", usage, region, 0, 12, stat="Average", label="%"),
        widget(f"serving stages, p50 (ms; {EMF_NAMESPACE} embedded metrics)", stages, region, 12, 12,
               stat="p50", label="ms"),
    ]}


def console_url(aws: Aws, name: str) -> str:
    return f"https://{aws.region}.console.aws.amazon.com/cloudwatch/home?region={aws.region}#dashboards:name={name}"


def scaling_target(aws: Aws, names: Names) -> float | None:
    policy = scaling_policy(aws, names)
    configuration = (policy or {}).get("TargetTrackingScalingPolicyConfiguration", {})
    return configuration.get("TargetValue")


def run(args: argparse.Namespace) -> None:
    aws = Aws.from_args(args)
    names = Names(args.name)
    cloudwatch = aws.client("cloudwatch")
    current = describe_or_none(cloudwatch.get_dashboard, DashboardName=names.dashboard)
    if args.remove:
        if current is None:
            aws.console.note(f"dashboard {names.dashboard}: none")
            return
        aws.send("cloudwatch", "delete_dashboards", DashboardNames=[names.dashboard])
        aws.changed(f"dashboard {names.dashboard}: deleted")
        return
    if args.target is not None and not args.target > 0:
        raise CliError(f"--target must be positive, got {args.target:g}")
    target = args.target if args.target is not None else scaling_target(aws, names)
    if target is None:
        aws.console.note("no auto-scaling policy: the invocations-per-instance graph has no target line "
                         "(run `kennel-aws autoscale`, or pass --target)")
    if describe_or_none(aws.client("sagemaker").describe_endpoint, EndpointName=names.endpoint) is None:
        aws.console.note(f"no endpoint {names.endpoint} yet: the graphs fill once `kennel-aws deploy` has run")
    body = dashboard_body(names.endpoint, aws.region, target)
    if current is not None and json.loads(current.get("DashboardBody") or "{}") == body:
        aws.console.note(f"dashboard {names.dashboard}: unchanged")
    else:
        answer = aws.send("cloudwatch", "put_dashboard", DashboardName=names.dashboard,
                          DashboardBody=json.dumps(body, separators=(",", ":")))
        for message in (answer or {}).get("DashboardValidationMessages", []):
            aws.console.note(f"dashboard {names.dashboard}: {message.get('DataPath', '')}: {message.get('Message')}")
        aws.changed(f"dashboard {names.dashboard}: {'updated' if current else 'created'}")
    aws.console.result(f"dashboard {names.dashboard} {console_url(aws, names.dashboard)}")
