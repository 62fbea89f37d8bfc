"""The CloudWatch part of a load test on a SageMaker endpoint: the window, the queries,
one figure per statistic (kennel_ops.load.endpoint_metrics)."""
from datetime import datetime, timezone

from kennel_ops.load import endpoint_metrics


def test_the_window_is_whole_minutes_around_the_run():
    start, end = endpoint_metrics.minute_window(datetime(2026, 5, 1, 10, 0, 42, 5, tzinfo=timezone.utc),
                                         datetime(2026, 5, 1, 10, 3, 7, tzinfo=timezone.utc))
    assert (start, end) == (datetime(2026, 5, 1, 10, 0, tzinfo=timezone.utc),
                            datetime(2026, 5, 1, 10, 4, tzinfo=timezone.utc))


def test_the_queries_name_the_endpoints_variant_in_both_namespaces():
    queries = endpoint_metrics.metric_queries("kennel")
    assert len({q["Id"] for q in queries}) == len(queries)
    seen = {(q["MetricStat"]["Metric"]["Namespace"], q["MetricStat"]["Metric"]["MetricName"]) for q in queries}
    assert seen == {("AWS/SageMaker", "ModelLatency"), ("AWS/SageMaker", "OverheadLatency"),
                    ("AWS/SageMaker", "Invocations"), ("/aws/sagemaker/Endpoints", "CPUUtilization")}
    for query in queries:
        assert query["MetricStat"]["Metric"]["Dimensions"] == [{"Name": "EndpointName", "Value": "kennel"},
                                                               {"Name": "VariantName", "Value": "AllTraffic"}]
        assert query["MetricStat"]["Period"] == 60


def test_one_figure_per_statistic_over_the_window():
    assert endpoint_metrics.over_window("Sum", [10, 20, 5]) == 35
    assert endpoint_metrics.over_window("Average", [10, 20]) == 15
    assert endpoint_metrics.over_window("p99", [100, 300, 200]) == 300  # the worst minute
    assert endpoint_metrics.over_window("Maximum", []) is None
