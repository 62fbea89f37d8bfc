"""kennel-aws dashboard against moto in server mode (PutDashboard, GetDashboard and
DeleteDashboards are moto's; it stores the body as given and does not validate it,
so the body's structure is checked here)."""
from __future__ import annotations

import json

import pytest

from aws_testkit import REGION

pytestmark = pytest.mark.aws
NAME = "kennel-endpoint"


def body(aws) -> dict:
    return json.loads(aws("cloudwatch").get_dashboard(DashboardName=NAME)["DashboardBody"])


def metrics_of(dashboard: dict) -> dict[str, list]:
    return {w["properties"]["title"]: w["properties"]["metrics"] for w in dashboard["widgets"]}


def test_dashboard_for_the_endpoint_with_the_scaling_target_then_unchanged(cli, moto, aws, deployed):
    assert cli("autoscale", "--target", "320")[0] == 0
    status, out, err = cli("dashboard")
    assert status == 0, err
    assert out == (f"dashboard {NAME} https://{REGION}.console.aws.amazon.com/cloudwatch/home?region={REGION}"
                   f"#dashboards:name={NAME}\n")
    assert f"dashboard {NAME}: created" in err
    dashboard = body(aws)
    assert all(w["properties"]["region"] == REGION for w in dashboard["widgets"])
    graphs = metrics_of(dashboard)
    latency = graphs["kennel: latency percentiles (ms)"]
    assert {(m[1], m[-1]["stat"]) for m in latency if isinstance(m[0], str)} == {
        ("ModelLatency", "p50"), ("ModelLatency", "p90"), ("ModelLatency", "p99"), ("OverheadLatency", "p99")}
    dimensions = ["EndpointName", "kennel", "VariantName", "AllTraffic"]
    assert all(m[2:6] == dimensions for m in latency if isinstance(m[0], str))
    per_instance = next(w for w in dashboard["widgets"] if "scaling target" in w["properties"]["title"])
    assert per_instance["properties"]["annotations"]["horizontal"] == [
        {"label": "auto-scaling target 320", "value": 320.0}]
    assert graphs["instances in service"][0][0]["expression"] == "invocations / per_instance"
    errors = {m[1] for m in graphs["errors per minute"]}
    assert {"Invocation4XXErrors", "Invocation5XXErrors"} <= errors
    stages = next(m for t, m in graphs.items() if t.startswith("serving stages"))
    assert [m[0]["expression"] for m in stages][0] == \
        "SEARCH('{kennel/Endpoint,Model} MetricName=\"ReadTime\"', 'p50', 60)"

    moto.reset_recording()
    status, _, err = cli("dashboard")
    assert status == 0 and f"dashboard {NAME}: unchanged" in err
    assert moto.mutating() == []

    status, _, err = cli("dashboard", "--target", "500")
    assert status == 0 and f"dashboard {NAME}: updated" in err
    assert "auto-scaling target 500" in json.dumps(body(aws))


def test_dashboard_without_policy_or_endpoint_says_so_and_draws_no_target(cli, moto, aws):
    status, _, err = cli("dashboard")
    assert status == 0, err
    assert "no auto-scaling policy" in err and "no endpoint kennel yet" in err
    per_instance = next(w for w in body(aws)["widgets"] if "scaling target" in w["properties"]["title"])
    assert "annotations" not in per_instance["properties"]


def test_dashboard_dry_run_sends_nothing_and_remove_deletes(cli, moto, aws, planned):
    status, out, _ = cli("dashboard", "--dry-run", "--target", "100")
    assert status == 0
    [request] = planned(out)
    assert (request["service"], request["operation"]) == ("cloudwatch", "PutDashboard")
    assert request["params"]["DashboardName"] == NAME
    assert aws("cloudwatch").list_dashboards()["DashboardEntries"] == []

    assert cli("dashboard")[0] == 0
    status, _, err = cli("dashboard", "--remove")
    assert status == 0 and f"dashboard {NAME}: deleted" in err
    assert aws("cloudwatch").list_dashboards()["DashboardEntries"] == []
    status, _, err = cli("dashboard", "--remove")
    assert status == 0 and f"dashboard {NAME}: none" in err


def test_dashboard_bad_target_is_one_line(cli, moto):
    status, _, err = cli("dashboard", "--target", "0")
    assert status == 1 and err == "error: --target must be positive, got 0\n"


def test_teardown_deletes_the_dashboard(cli, moto, aws):
    assert cli("dashboard")[0] == 0
    status, _, err = cli("teardown", "--yes", "--poll-seconds", "0.01")
    assert status == 0, err
    assert aws("cloudwatch").list_dashboards()["DashboardEntries"] == []
