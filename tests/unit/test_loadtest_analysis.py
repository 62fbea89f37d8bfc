"""The analysis of a load test: percentiles, step criteria, the ramp and its stop
rules, the recommendation, trends, the report and the plot."""
import json
import math
import random

import numpy as np
import pytest

from kennel_ops.load.client import Outcome, Run, Target, run_closed_loop
from kennel_ops.load.report import ConfigurationResult, build_report, plot, step_table, summary_text, write_json
from kennel_ops.load.stats import (StepSummary, failure_reason, linear_fit, max_sustainable, percentile, ramp,
                               recommended_invocations_per_instance, summarize, trend)
from loadtest_server import CapacityServer


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 95, 99, 99.9, 100])
def test_percentile_matches_numpy(q):
    values = [random.Random(q).expovariate(10) for _ in range(1001)]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_edges():
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0], 50) == 1.5
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def _step(concurrency, throughput, p99, successes=100, requests=100):
    latency = {"p50": p99 / 2, "p90": p99 * 0.8, "p95": p99 * 0.9, "p99": p99, "max": p99, "mean": p99 / 2}
    return StepSummary(concurrency, None, requests, successes, 10.0, throughput, latency)


def test_summarize_counts_and_rates():
    outcomes = [Outcome(i * 0.1, 0.01 * (i + 1), 200) for i in range(10)]
    outcomes.append(Outcome(1.0, 5.0, 0, "timeout"))
    step = summarize(Run(outcomes, began=100.0, ended=102.0, concurrency=2))
    assert (step.requests, step.successes, step.concurrency) == (11, 10, 2)
    assert step.throughput == pytest.approx(5.0)
    assert step.latency["max"] == pytest.approx(0.1)  # the timeout is an error, not a latency
    assert step.latency["p50"] == pytest.approx(0.055)
    assert step.errors == {"timeout": 1}
    assert failure_reason(step, 1.0) == "success 90.91% < 100%"
    assert step.worker_p50 is None  # the server did not say
    timed = [Outcome(i * 0.1, 0.05, 200, server_s=0.01 * (i + 1)) for i in range(5)]
    assert summarize(Run(timed, 0.0, 1.0)).worker_p50 == pytest.approx(0.03)


def test_step_criteria():
    assert failure_reason(_step(1, 10, 0.5), 1.0) is None
    assert "p99 1200 ms > target 1000 ms" == failure_reason(_step(1, 10, 1.2), 1.0)
    assert failure_reason(_step(1, 10, 0.5, successes=99), 1.0).startswith("success 99.00%")
    empty = summarize(Run([], 0.0, 1.0, concurrency=1))
    assert failure_reason(empty, 1.0) == "no requests completed"


def test_max_sustainable_ignores_fast_steps_that_failed():
    steps = [_step(1, 10, 0.1), _step(2, 18, 0.3), _step(4, 25, 0.9, successes=99), _step(8, 22, 1.5)]
    assert max_sustainable(steps, 1.0).concurrency == 2
    assert max_sustainable(steps, 0.05) is None


def _scripted(results):
    calls = []

    def run_step(concurrency):
        calls.append(concurrency)
        return results[concurrency]
    return run_step, calls


def test_ramp_stops_at_the_first_failing_step():
    run_step, calls = _scripted({1: _step(1, 10, 0.1), 2: _step(2, 19, 0.2), 4: _step(4, 30, 1.4),
                                 8: _step(8, 31, 2.0)})
    result = ramp(run_step, [1, 2, 4, 8], 1.0)
    assert calls == [1, 2, 4]
    assert result.stopped_because == "concurrency 4: p99 1400 ms > target 1000 ms"
    assert max_sustainable(result.steps, 1.0).throughput == 19


def test_ramp_stops_when_throughput_saturates():
    run_step, calls = _scripted({1: _step(1, 10, 0.1), 2: _step(2, 20, 0.1), 3: _step(3, 20.5, 0.15),
                                 4: _step(4, 20.2, 0.2), 6: _step(6, 21, 0.3), 8: _step(8, 30, 0.4)})
    result = ramp(run_step, [1, 2, 3, 4, 6, 8], 1.0)
    assert calls == [1, 2, 3, 4]
    assert "saturated" in result.stopped_because
    run_step, calls = _scripted({1: _step(1, 10, 0.1), 2: _step(2, 20, 0.1)})
    assert "highest concurrency" in ramp(run_step, [1, 2], 1.0).stopped_because
    with pytest.raises(ValueError):
        ramp(run_step, [2, 1], 1.0)


def test_ramp_finds_the_capacity_of_a_real_server():
    # 2 slots x 100 ms: 20 requests/s at most. Target p99 350 ms: 2 clients (about
    # 100 ms) and 4 clients (about 200 ms) pass, 8 clients queue to about 400 ms.
    with CapacityServer(slots=2, service_s=0.1) as server:
        target = Target(server.url)
        result = ramp(lambda c: summarize(run_closed_loop(target, [b"x"], c, duration_s=2.0, max_requests=1000)),
                      [1, 2, 4, 8, 16], target_p99_s=0.35)
    best = max_sustainable(result.steps, 0.35)
    assert [s.concurrency for s in result.steps][:3] == [1, 2, 4]
    assert best.concurrency in (2, 4)
    assert 14 <= best.throughput <= 20.5


def test_recommendation_is_the_aws_formula():
    assert recommended_invocations_per_instance(10.0, 0.5) == 300
    assert recommended_invocations_per_instance(8.33, 0.5) == 249  # rounded down: never above the measurement
    assert recommended_invocations_per_instance(0.01, 0.5) == 1
    with pytest.raises(ValueError):
        recommended_invocations_per_instance(10.0, 0)
    with pytest.raises(ValueError, match="nothing to recommend"):
        recommended_invocations_per_instance(0.0, 0.5)


def test_linear_fit_and_trend():
    xs = [float(i) for i in range(60)]
    slope, intercept = linear_fit(xs, [3 + 0.5 * x for x in xs])
    assert slope == pytest.approx(0.5) and intercept == pytest.approx(3)
    noise = random.Random(0)
    flat = [500 + noise.uniform(-10, 10) for _ in xs]
    assert trend(xs, flat, abs_tolerance=16, rel_tolerance=0.02).flat
    leaking = [500 + 1.0 * x + noise.uniform(-10, 10) for x in xs]  # 1 MiB/s: 59 MiB over the window
    leak = trend(xs, leaking, abs_tolerance=16, rel_tolerance=0.02)
    assert not leak.flat and leak.growth == pytest.approx(59, abs=8)
    assert trend(xs, [600 - x for x in xs], 16, 0.02).flat  # memory given back is fine
    with pytest.raises(ValueError):
        linear_fit([1.0], [1.0])


def _result(settings, steps):
    return ConfigurationResult(settings, steps, "saturated", target_p99_s=1.0)


def test_report_json_plot_and_text(tmp_path):
    nan_latency = {k: math.nan for k in ("p50", "p90", "p95", "p99", "max", "mean")}
    failed = StepSummary(16, None, 10, 0, 10.0, 0.0, nan_latency, {"timeout": 10})
    results = [_result({"SAGEMAKER_MODEL_SERVER_WORKERS": "1"}, [_step(1, 9, 0.2), _step(2, 12, 0.5)]),
               _result({"SAGEMAKER_MODEL_SERVER_WORKERS": "2"}, [_step(1, 10, 0.2), _step(2, 16.6, 0.4), failed])]
    results[1].layout = {"workers": 2, "threads": 1}
    results[1].steps[1].cpu_percent = 166.0  # 16.6 answers/s with 1.66 cores busy
    report = build_report(results, url="http://127.0.0.1:8080/invocations", target_p99_s=1.0, safety_factor=0.5,
                          settings={"step_duration_s": 10}, host_note="test host")
    assert report["max_sustainable_rps"] == 16.6
    assert report["recommended_invocations_per_instance"] == 498
    assert report["best_configuration"]["settings"] == {"SAGEMAKER_MODEL_SERVER_WORKERS": "2"}
    assert report["best_configuration"]["at_concurrency"] == 2
    assert report["best_configuration"]["requests_per_cpu_second_at_max"] == pytest.approx(10.0)
    assert report["configurations"][0]["requests_per_cpu_second_at_max"] is None  # CPU not sampled

    path = write_json(report, tmp_path / "out" / "report.json")
    loaded = json.loads(path.read_text())  # strict JSON: the failed step's NaN became null
    assert loaded["recommended_invocations_per_instance"] == 498
    assert loaded["configurations"][1]["steps"][2]["latency"]["p99"] is None
    assert "NaN" not in path.read_text()

    png = plot(results, 1.0, tmp_path / "out" / "latency.png", "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image
    with Image.open(png) as image:
        assert image.size[0] > 500

    text = summary_text(report)
    assert "16.60 requests/s" in text and "498" in text
    assert "166% of one core, 10.00 requests per CPU-second" in text
    assert "SAGEMAKER_MODEL_SERVER_WORKERS=2 (2 workers x 1 engine threads)" in text
    assert loaded["best_configuration"]["layout"] == {"workers": 2, "threads": 1}
    results[1].layout["solo_threads"] = 2
    assert results[1].label == ("SAGEMAKER_MODEL_SERVER_WORKERS=2 (2 workers x 1 engine threads, "
                                "2 for a request alone)")
    results[1].steps[0].worker_p50 = 0.0425
    table = step_table(results[1].steps)
    assert "timeout: 10" in table and len(table.splitlines()) == 5
    header, _, first, second, _ = table.splitlines()
    assert header.split()[9] == "work" and first.split()[9] == "42" and second.split()[9] == "-"


def test_the_layout_is_read_from_the_launchers_ready_line():
    from kennel_ops.load.serving import parse_layout
    logs = ("kennel-serve: starting\nkennel-serve: ready: "
            "http://0.0.0.0:8080, 2 worker(s) x 1 engine thread(s) (2 for a request alone), 2.4 s after start\n")
    assert parse_layout(logs) == {"workers": 2, "threads": 1, "solo_threads": 2}
    assert parse_layout("ready: http://0.0.0.0:8080, 4 worker(s) x 2 engine thread(s), 1.0 s") == \
        {"workers": 4, "threads": 2}  # a server from before the solo session
    assert parse_layout("starting\n") is None


def test_report_without_any_passing_step_recommends_nothing():
    results = [_result({}, [_step(1, 5, 2.0)])]
    report = build_report(results, url="u", target_p99_s=1.0, safety_factor=0.5, settings={})
    assert report["recommended_invocations_per_instance"] is None
    assert report["best_configuration"] is None
    assert summary_text(report).startswith("no step kept 100% success")
