"""What CloudWatch saw of a load test on a SageMaker endpoint: ModelLatency and
OverheadLatency (microseconds), Invocations and the instances' CPUUtilization, per
minute over the run's window, for the report next to the client's own figures.

SageMaker publishes these once a minute, a few minutes late: a read right after a
run may miss its last minutes (the report says how many minutes came back).
"""
from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from typing import Any

from kennel_ops.aws.names import VARIANT  # the variant kennel-aws deploy creates

METRIC_PERIOD_S = 60
# (namespace, metric, statistics): the invocation metrics, then the instance metrics.
QUERIES = (
    ("AWS/SageMaker", "ModelLatency", ("Average", "p50", "p99")),
    ("AWS/SageMaker", "OverheadLatency", ("Average", "p99")),
    ("AWS/SageMaker", "Invocations", ("Sum",)),
    ("/aws/sagemaker/Endpoints", "CPUUtilization", ("Average", "Maximum")),
)


def minute_window(began: datetime, ended: datetime) -> tuple[datetime, datetime]:
    """Whole minutes covering [began, ended] (CloudWatch's periods start on the minute)."""
    start = began.astimezone(timezone.utc).replace(second=0, microsecond=0)
    end = ended.astimezone(timezone.utc).replace(second=0, microsecond=0) + timedelta(minutes=1)
    return start, end


def metric_queries(endpoint: str, variant: str = VARIANT) -> list[dict[str, Any]]:
    dimensions = [{"Name": "EndpointName", "Value": endpoint}, {"Name": "VariantName", "Value": variant}]
    queries = []
    for namespace, metric, stats in QUERIES:
        for stat in stats:
            queries.append({"Id": f"m{len(queries)}", "Label": f"{metric} {stat}", "ReturnData": True,
                            "MetricStat": {"Metric": {"Namespace": namespace, "MetricName": metric,
                                                      "Dimensions": dimensions},
                                           "Period": METRIC_PERIOD_S, "Stat": stat}})
    return queries


def over_window(stat: str, values: list[float]) -> float | None:
    """One figure for the window: the sum of Sums, the highest of per-minute percentiles and
    maxima (the worst minute), the mean of per-minute averages."""
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return None
    if stat == "Sum":
        return sum(values)
    if stat == "Average":
        return sum(values) / len(values)
    return max(values)


def fetch_metric_series(cloudwatch, queries: list[dict[str, Any]], start: datetime,
                        end: datetime) -> dict[str, dict[str, list]]:
    """{label: {"timestamps", "values"}} of one set of queries (GetMetricData, one call per page)."""
    labels = {q["Id"]: q["Label"] for q in queries}
    series: dict[str, dict[str, list]] = {}
    token = None
    while True:
        page = cloudwatch.get_metric_data(MetricDataQueries=queries, StartTime=start, EndTime=end,
                                          ScanBy="TimestampAscending", **({"NextToken": token} if token else {}))
        for result in page["MetricDataResults"]:
            entry = series.setdefault(labels[result["Id"]], {"timestamps": [], "values": []})
            for at, value in zip(result.get("Timestamps", []), result.get("Values", [])):
                if value is not None:
                    entry["timestamps"].append(at.isoformat())
                    entry["values"].append(float(value))
        token = page.get("NextToken")
        if not token:
            return series


def read_endpoint_metrics(cloudwatch, endpoint: str, began: datetime, ended: datetime,
                          variant: str = VARIANT) -> dict[str, Any]:
    """The report's `cloudwatch` section for one run. The percentiles are a call of their own:
    a store that cannot compute them (moto) still gives the other figures."""
    start, end = minute_window(began, ended)
    queries = metric_queries(endpoint, variant)
    percentiles = [q for q in queries if q["MetricStat"]["Stat"].startswith("p")]
    series = fetch_metric_series(cloudwatch, [q for q in queries if q not in percentiles], start, end)
    problems = []
    try:
        series.update(fetch_metric_series(cloudwatch, percentiles, start, end))
    except Exception as exc:  # noqa: BLE001 - the averages and sums stand without the percentiles
        problems.append(f"percentiles not read: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
    metrics: dict[str, dict[str, Any]] = {}
    for label, entry in series.items():
        metric, stat = label.split(" ")
        metrics.setdefault(metric, {})[stat] = {"over_window": over_window(stat, entry["values"]),
                                                "minutes": len(entry["values"]), **entry}
    return {"endpoint": endpoint, "variant": variant, "start": start.isoformat(), "end": end.isoformat(),
            "period_s": METRIC_PERIOD_S, "units": {"ModelLatency": "microseconds", "OverheadLatency": "microseconds",
                                            "Invocations": "count", "CPUUtilization": "percent (100 = one core)"},
            "metrics": metrics, "problems": problems}


def summary_line(section: dict[str, Any]) -> str:
    """One line for the console."""
    metrics = section["metrics"]

    def figure(metric: str, stat: str, scale: float = 1.0, unit: str = "") -> str:
        value = metrics.get(metric, {}).get(stat, {}).get("over_window")
        return "-" if value is None else f"{value * scale:.0f}{unit}"

    minutes = max((s["minutes"] for stats in metrics.values() for s in stats.values()), default=0)
    return (f"CloudWatch ({minutes} minute(s) so far): ModelLatency p99 {figure('ModelLatency', 'p99', 1e-3, ' ms')}, "
            f"OverheadLatency p99 {figure('OverheadLatency', 'p99', 1e-3, ' ms')}, "
            f"Invocations {figure('Invocations', 'Sum')}, CPU {figure('CPUUtilization', 'Average', 1, '%')}")


def now() -> datetime:
    return datetime.now(timezone.utc)
