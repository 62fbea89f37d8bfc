"""kennel_serve.metrics and metrics_endpoint: stage clock, request line, worker counts, Prometheus text."""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request

import pytest
from mms.context import Context, RequestProcessor

from kennel_serve import metrics
from kennel_serve.metrics_endpoint import prometheus_text, resident_bytes, start_metrics_endpoint
from kennel_serve.mms_toolkit.transformer import KennelTransformer
from kennel_serve.settings import ServeSettings, SettingsError
from kennel_ops.ports import free_mms_port as free_port


def test_nested_stages_count_once_and_add_up_to_the_whole():
    clock = metrics.StageClock()
    began = time.perf_counter()
    with clock.stage("read"):
        time.sleep(0.01)
        with clock.stage("decode"):
            time.sleep(0.01)
            with clock.stage("fetch"):
                time.sleep(0.02)
        time.sleep(0.01)
    whole = time.perf_counter() - began
    assert clock.seconds["fetch"] >= 0.02 and 0.01 <= clock.seconds["decode"] < 0.02
    assert clock.seconds["read"] >= 0.02
    assert sum(clock.seconds.values()) == pytest.approx(whole, abs=0.002)


def test_outside_a_request_stage_measures_nothing():
    assert metrics.clock is None
    with metrics.stage("decode"):
        pass


def test_the_request_line_is_json_with_bounded_emf_dimensions_and_no_payload():
    stages = dict.fromkeys(metrics.STAGES, 0.002)
    line = metrics.request_line(request_id="abc", inference_id="inf-1", status=413, model="kennel", worker_s=0.0125,
                                stages_s=stages, received=10, sent=20, emf=True)
    assert line.startswith('{"request_id":')  # what log4j2.xml routes on
    record = json.loads(line)
    assert record["request_id"] == "abc" and record["inference_id"] == "inf-1" and record["StatusClass"] == "4xx"
    assert record["WorkerTime"] == 12.5 and record["ForwardTime"] == 2.0
    directives = record["_aws"]["CloudWatchMetrics"]
    assert {d["Namespace"] for d in directives} == {metrics.EMF_NAMESPACE}
    dimensions = {name for d in directives for group in d["Dimensions"] for name in group}
    assert dimensions == {"Model", "StatusClass"}  # never the request id
    for directive in directives:
        for metric in directive["Metrics"]:
            assert isinstance(record[metric["Name"]], (int, float))
    assert "_aws" not in json.loads(metrics.request_line(request_id="abc", inference_id=None, status=200,
                                                          model="kennel", worker_s=0.01, stages_s=stages,
                                                          received=1, sent=1, emf=False))


def test_worker_files_sum_to_the_totals(tmp_path):
    for pid in range(3):
        counts = metrics.WorkerCounts()
        for status in (200, 200, 400):
            counts.add(status, 0.03, dict.fromkeys(metrics.STAGES, 0.005), 100, 50)
        counts_file = metrics.CountsFile(tmp_path)
        counts_file.write(counts)  # as the worker of that pid wrote it
        os.replace(tmp_path / metrics.METRICS_DIR / f"{os.getpid()}{metrics.COUNTS_SUFFIX}",
                   tmp_path / metrics.METRICS_DIR / f"{1000 + pid}{metrics.COUNTS_SUFFIX}")
    (tmp_path / metrics.METRICS_DIR / f"9{metrics.COUNTS_SUFFIX}").write_text("{not json")  # skipped, not fatal
    total = metrics.read_all_workers(tmp_path)
    assert total.answers == {"2xx": 6, "4xx": 3} and total.worker.count == 9
    assert total.received_bytes == 900 and total.stages["forward"].sum == pytest.approx(0.045)
    text = prometheus_text(total, "kennel", busy=1, live=2, resident_bytes=123)
    assert 'kennel_requests_total{model="kennel",status_class="2xx"} 6' in text
    assert 'kennel_stage_seconds_bucket{model="kennel",stage="forward",le="+Inf"} 9' in text
    assert 'kennel_request_seconds_bucket{model="kennel",le="0.025"} 0' in text
    assert 'kennel_request_seconds_bucket{model="kennel",le="0.05"} 9' in text
    assert "kennel_busy_workers{model=\"kennel\"} 1" in text and "kennel_resident_memory_bytes" in text


def test_the_counts_file_is_rewritten_in_place_and_a_half_written_one_is_refused(tmp_path):
    counts, counts_file = metrics.WorkerCounts(), metrics.CountsFile(tmp_path)
    path = tmp_path / metrics.METRICS_DIR / f"{os.getpid()}{metrics.COUNTS_SUFFIX}"
    counts.add(200, 123.456789, dict.fromkeys(metrics.STAGES, 1 / 3), 10, 10)
    counts_file.write(counts)
    inode, longer = path.stat().st_ino, path.stat().st_size
    shorter = metrics.WorkerCounts(answers={"2xx": 1})  # a shorter record than the one before
    counts_file.write(shorter)
    assert path.stat().st_ino == inode and path.stat().st_size == longer  # same file, padded
    assert metrics.read_counts(path) == shorter
    whole = path.read_bytes()
    torn = whole.replace(b'"2xx":1', b'"2xx":7')  # what a reader may catch while a write is under way
    path.write_bytes(torn)
    with pytest.raises(ValueError):
        metrics.read_counts(path)
    assert metrics.read_all_workers(tmp_path).answers == {}  # skipped this scrape, read again at the next


def test_resident_memory_covers_this_process():
    assert resident_bytes(os.getpid()) > 10 * 2**20


def test_the_endpoint_serves_metrics_and_nothing_else(tmp_path):
    settings = ServeSettings(model_dir=tmp_path, state_dir=tmp_path, bind_address="127.0.0.1",
                             metrics_port=free_port())
    server = start_metrics_endpoint(settings)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{settings.metrics_port}/metrics", timeout=5) as reply:
            assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert b"kennel_workers" in reply.read()
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{settings.metrics_port}/invocations", timeout=5)
        assert refused.value.code == 404
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("env, fragment", [
    ({"KENNEL_METRICS_PORT": "8080"}, "is the client port"),
    ({"KENNEL_METRICS_PORT": "-1"}, "KENNEL_METRICS_PORT=-1"),
    ({"KENNEL_METRICS_MODEL": "a b"}, "KENNEL_METRICS_MODEL"),
    ({"KENNEL_METRICS_EMF": "maybe"}, "KENNEL_METRICS_EMF"),
])
def test_bad_metrics_settings_are_refused_with_the_variable(env, fragment):
    with pytest.raises(SettingsError, match=fragment):
        ServeSettings.from_env(env)


class _Handlers:
    def default_model_fn(self, model_dir):
        return "model"

    def default_input_fn(self, input_data, content_type):
        time.sleep(0.005)
        if input_data == b"bad":
            from kennel_serve.mms_toolkit.errors import bad_request
            raise bad_request("no dog")
        return input_data

    def default_predict_fn(self, data, model):
        time.sleep(0.01)
        return data

    def default_output_fn(self, prediction, accept):
        return json.dumps({"ok": True}), "application/json"


def _invoke(transformer, context, body, headers):
    context.request_processor = [RequestProcessor(dict(headers))]
    transformer.transform([{"body": body}], context)
    processor = context.request_processor[0]
    return processor.get_response_status_code(), processor.get_response_headers()


def test_each_answer_has_stage_timings_an_id_a_log_line_and_counts(tmp_path, capsys):
    settings = ServeSettings(model_dir=tmp_path, state_dir=tmp_path / "state", metrics=True, metrics_emf=True)
    transformer = KennelTransformer(_Handlers(), settings)
    context = Context("model", str(tmp_path), {}, 1, None, "1.1.11")
    status, headers = _invoke(transformer, context, b"jpeg", {"Content-Type": "image/jpeg",
                                                              "X-Amzn-RequestId": "sm-123"})
    assert status == 200 and headers["X-Kennel-Request-Id"] == "sm-123"
    entries = dict(entry.split(";dur=") for entry in headers["Server-Timing"].split(", "))
    assert list(entries) == ["worker", *metrics.STAGES]
    assert float(entries["forward"]) >= 10 and float(entries["decode"]) >= 5
    assert sum(float(entries[s]) for s in metrics.STAGES) <= float(entries["worker"]) + 0.1 * len(metrics.STAGES)
    status, headers = _invoke(transformer, context, b"bad", {"Content-Type": "image/jpeg",
                                                             "x-amzn-sagemaker-inference-id": "client-7"})
    assert status == 400 and headers["X-Kennel-Request-Id"] == "client-7"
    _, headers = _invoke(transformer, context, b"jpeg", {"Content-Type": "image/jpeg"})
    assert len(headers["X-Kennel-Request-Id"]) >= 16  # generated
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["request_id"], line["status"]) for line in lines] == [
        ("sm-123", 200), ("client-7", 400), (headers["X-Kennel-Request-Id"], 200)]
    assert all("_aws" in line and "jpeg" not in json.dumps(line) for line in lines)
    total = metrics.read_all_workers(settings.state_dir)
    assert total.answers == {"2xx": 2, "4xx": 1} and total.stages["forward"].count == 3


def test_with_metrics_off_only_the_worker_time_and_the_id_remain(tmp_path, capsys):
    settings = ServeSettings(model_dir=tmp_path, state_dir=tmp_path / "state", metrics=False)
    transformer = KennelTransformer(_Handlers(), settings)
    context = Context("model", str(tmp_path), {}, 1, None, "1.1.11")
    status, headers = _invoke(transformer, context, b"jpeg", {"Content-Type": "image/jpeg"})
    assert status == 200 and headers["Server-Timing"].startswith("worker;dur=") and "," not in headers["Server-Timing"]
    assert headers["X-Kennel-Request-Id"]
    assert capsys.readouterr().out == "" and not (settings.state_dir / metrics.METRICS_DIR).exists()
