"""KennelTransformer against the toolkit's defects (kennel_serve.mms_toolkit.transformer).

The real sagemaker-inference Transformer and MMS request context, with stand-in
handlers instead of a model: what reaches the handlers, and what goes back to MMS.
"""
from __future__ import annotations

import json
import logging
import os

import pytest
from mms.context import Context, RequestProcessor

from kennel_serve.mms_toolkit.activity import WORKERS_DIR
from kennel_serve.mms_toolkit.errors import bad_request
from kennel_serve.mms_toolkit.transformer import INTERNAL_ERROR_MESSAGE, KennelTransformer
from kennel_serve.settings import ServeSettings


class Handlers:
    """Records what the toolkit passes to each handler; input_fn raises what the body asks for."""

    def __init__(self, state_dir):
        self.state_dir = state_dir
        self.seen: list[tuple] = []

    def default_model_fn(self, model_dir):
        return "model"

    def default_input_fn(self, input_data, content_type):
        busy = (self.state_dir / WORKERS_DIR / str(os.getpid())).read_bytes()
        self.seen.append(("input", input_data, content_type, busy))
        if input_data in ("client mistake", b"client mistake"):
            raise bad_request("the dog is not in the picture")
        if input_data in ("internal", b"internal"):
            raise RuntimeError("internal detail /opt/secret/path")
        return input_data

    def default_predict_fn(self, data, model):
        return data

    def default_output_fn(self, prediction, accept):
        self.seen.append(("output", accept))
        return json.dumps({"ok": True}), "application/json"


class Worker:
    def __init__(self, tmp_path, **settings):
        self.handlers = Handlers(tmp_path / "state")
        self.settings = ServeSettings(model_dir=tmp_path, state_dir=tmp_path / "state", **settings)
        self.transformer = KennelTransformer(self.handlers, self.settings)
        self.context = Context("model", str(tmp_path), {}, 1, None, "1.1.11")

    def invoke(self, body, headers: dict) -> tuple[int, dict, str]:
        # As MMS does it: one context, its request processor replaced for each request.
        self.context.request_processor = [RequestProcessor(dict(headers))]
        (answer,) = self.transformer.transform([{"body": body}], self.context)
        processor = self.context.request_processor[0]
        text = answer if isinstance(answer, str) else bytes(answer).decode()
        return int(processor.get_response_status_code()), processor.get_response_headers(), text


@pytest.fixture
def worker(tmp_path, monkeypatch):
    monkeypatch.setenv("SAGEMAKER_PROGRAM", "kennel_test_no_user_module")
    return Worker(tmp_path)


def test_a_request_error_keeps_its_status_and_message(worker):
    status, headers, body = worker.invoke(b"client mistake", {"Content-Type": "image/jpeg"})
    assert status == 400 and headers["content-type"] == "application/json"
    assert json.loads(body) == {"error": "the dog is not in the picture"}  # no traceback appended


def test_an_internal_error_says_nothing_to_the_client_and_everything_to_the_log(worker, caplog):
    with caplog.at_level(logging.ERROR):
        status, headers, body = worker.invoke(b"internal", {"Content-Type": "image/jpeg"})
    assert status == 500 and json.loads(body) == {"error": INTERNAL_ERROR_MESSAGE}
    assert "secret" not in body and "Traceback" not in body
    assert "internal detail /opt/secret/path" in caplog.text and "Traceback" in caplog.text


def test_media_type_parameters_are_stripped_and_the_json_body_is_decoded(worker):
    status, _, _ = worker.invoke(b'{"image": "x"}', {"Content-Type": "Application/JSON; charset=UTF-8"})
    assert status == 200
    # The toolkit decodes a JSON body only when the Content-Type is exactly application/json.
    assert worker.handlers.seen[0][1:3] == ('{"image": "x"}', "application/json")


def test_header_names_in_any_case_reach_the_handlers(worker):
    status, _, _ = worker.invoke(b"jpeg", {"CONTENT-TYPE": "image/jpeg", "ACCEPT": "application/vnd.kennel.topk+json"})
    assert status == 200
    assert worker.handlers.seen[0][2] == "image/jpeg"
    assert worker.handlers.seen[1] == ("output", "application/vnd.kennel.topk+json")


def test_a_json_body_that_is_not_utf8_is_a_400(worker):
    status, _, body = worker.invoke(b"\xff\xfe\x00{", {"Content-Type": "application/json"})
    assert status == 400 and "not valid UTF-8" in json.loads(body)["error"]
    assert worker.handlers.seen == []


@pytest.mark.parametrize("content_type", ["application/json; charset=latin-1", "text/csv; charset=utf-16",
                                          "application/jsonlines; charset=iso-8859-1"])
def test_a_text_body_in_another_charset_is_a_415(worker, content_type):
    status, _, body = worker.invoke(b"{}", {"Content-Type": content_type})
    assert status == 415 and "send UTF-8" in json.loads(body)["error"]


def test_a_body_over_the_payload_limit_is_a_json_413_before_any_handler(tmp_path, monkeypatch):
    monkeypatch.setenv("SAGEMAKER_PROGRAM", "kennel_test_no_user_module")
    worker = Worker(tmp_path, max_payload_bytes=1024)
    status, headers, body = worker.invoke(b"\0" * 1025, {"Content-Type": "image/jpeg"})
    assert status == 413 and headers["content-type"] == "application/json"
    assert "more than the limit of 1024 bytes" in json.loads(body)["error"]
    assert worker.handlers.seen == []
    assert worker.invoke(b"\0" * 1024, {"Content-Type": "image/jpeg"})[0] == 200


def test_every_answer_says_how_long_the_worker_took_and_the_worker_is_busy_only_meanwhile(worker):
    flag = worker.settings.state_dir / WORKERS_DIR / str(os.getpid())
    for body, expected in ((b"jpeg", 200), (b"client mistake", 400), (b"internal", 500)):
        status, headers, _ = worker.invoke(body, {"Content-Type": "image/jpeg"})
        name, _, duration = headers["Server-Timing"].split(",")[0].partition(";dur=")
        assert status == expected and name == "worker" and float(duration) >= 0
        assert flag.read_bytes() == b"0"
    assert [entry[3] for entry in worker.handlers.seen if entry[0] == "input"] == [b"1"] * 3
