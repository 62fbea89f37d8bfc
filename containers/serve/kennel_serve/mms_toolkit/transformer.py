"""The toolkit's Transformer, with its defects worked around from the outside.

sagemaker_inference.transformer.Transformer (1.10.1) runs input_fn -> predict_fn ->
output_fn and turns exceptions into HTTP errors, but:

- it appends the full traceback to every error body, client mistakes included, and
  puts str(exc) of any other exception (paths, internals) in a 500's body;
- a Content-Type with parameters ("application/json; charset=utf-8") is passed on as
  is, so the JSON body is not decoded and a plain comparison in user code fails;
- it decodes JSON bodies as UTF-8 without checking: a body that is not UTF-8, or
  declares another charset, raises inside the toolkit, a 500;
- it finds Accept as "Accept" or "accept" only, and Content-Type only by the pattern
  [Cc]ontent-?[Tt]ype, so "ACCEPT" or "CONTENT-TYPE" are not seen;
- it has no payload limit of its own, and MMS's (max_request_size) answers with Netty's
  bare 413 without a reason.

KennelTransformer screens each request before the toolkit sees it (payload limit,
header names and Content-Type normalised, charset and UTF-8 checked), renders every
error as {"error": "..."} with the right status and no traceback (5xx details go to
the log only), marks the worker busy while it works (activity.py), and tells the
client how long the worker took: a W3C ``Server-Timing: worker;dur=<ms>`` header on
every answer, so a client can tell the model's time from the time its request waited
in the server's queue, and which graph answered: ``X-Kennel-Precision: int8; setting=auto;
speedup=2.41`` (kennel_serve.precision). With KENNEL_METRICS on (the default), Server-Timing goes on
with one entry per stage
(kennel_serve.metrics.STAGES). Every answer, errors too, carries ``X-Kennel-Request-Id``:
SageMaker's X-Amzn-RequestId, else the client's X-Amzn-SageMaker-Inference-Id,
else MMS's own id of the request (MMS's X-Request-Id). The handlers the toolkit runs (_run_handler_function)
are timed as decode (input_fn), forward (predict_fn) and render (output_fn), user
code's too; then the request's line is printed and the worker's counts written
(kennel_serve.metrics).

Proved by: tests/unit/test_serve_transformer.py (every point above),
tests/contract/test_serve_http.py::test_bad_input_is_a_clear_4xx_and_the_server_stays_healthy,
tests/contract/test_serve_http.py::test_payload_over_the_limit_is_413,
tests/contract/test_serve_http.py::test_every_answer_says_how_long_the_worker_took,
tests/contract/test_serve_user_code.py::test_user_errors_keep_their_status_and_internal_errors_say_nothing,
tests/contract/test_serve_user_code.py::test_user_input_and_output_fn_with_the_default_model_and_predict_fn,
tests/unit/test_serve_metrics.py, tests/contract/test_serve_observability.py.
"""
from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from http import HTTPStatus
from typing import Any

from sagemaker_inference import content_types
from sagemaker_inference.errors import BaseInferenceToolkitError
from sagemaker_inference.transformer import Transformer

from kennel_serve import metrics
from kennel_serve.inputs import JSONLINES_CONTENT_TYPES, parse_media_type
from kennel_serve.mms_toolkit.activity import WorkerActivity
from kennel_serve.mms_toolkit.errors import RequestError, bad_request, payload_too_large, unsupported_media_type
from kennel_serve.precision import HEADER, Choice
from kennel_serve.settings import MIB, ServeSettings

log = logging.getLogger(__name__)

_TEXT_CHARSETS = ("utf-8", "utf8", "us-ascii", "ascii")
INTERNAL_ERROR_MESSAGE = "internal error while handling the request; the server log has the details"
# Request id headers, first found wins (compared case-insensitively).
REQUEST_ID_HEADERS = ("x-amzn-requestid", "x-amzn-sagemaker-inference-id")
INFERENCE_ID_HEADER = "x-amzn-sagemaker-inference-id"
# Not X-Request-Id: MMS's frontend (NettyUtils) replaces that one with its own id of the
# request, which is also the id here when the request carries neither header above.
REQUEST_ID_RESPONSE_HEADER = "X-Kennel-Request-Id"


def request_headers(context: Any) -> dict:
    """The current request's headers from the MMS context ({} outside MMS).

    MMS replaces context.request_processor for each request, and the toolkit hands the
    handler functions the context it was initialised with: the same object.
    """
    try:
        return context.request_processor[0].get_request_properties() or {}
    except (AttributeError, IndexError, TypeError):
        return {}


class KennelTransformer(Transformer):
    def __init__(self, default_inference_handler: Any, settings: ServeSettings,
                 activity: WorkerActivity | None = None):
        super().__init__(default_inference_handler=default_inference_handler)
        self.settings = settings
        self._activity = activity or WorkerActivity(settings.state_dir)
        self._counts = metrics.WorkerCounts()  # this worker's, since it started
        self._counts_file = metrics.CountsFile(settings.state_dir)

    def transform(self, data: list, context: Any) -> list:
        began = time.perf_counter()
        clock = metrics.StageClock() if self.settings.metrics else None
        metrics.clock = clock
        try:
            with self._activity.busy():
                if clock is None:
                    answers = self._transform(data, context)
                else:
                    with clock.stage("read"):  # the stages below pause it while they run
                        answers = self._transform(data, context)
        finally:
            metrics.clock = None
        worker_s = time.perf_counter() - began
        timing = f"worker;dur={worker_s * 1000:.1f}"
        if clock is not None:
            timing += "".join(f", {name};dur={seconds * 1000:.1f}" for name, seconds in clock.seconds.items())
        headers = request_headers(context)
        request_id = self._request_id(headers, context)
        # Which graph answered (precision.py): absent while model_fn is a user's own.
        choice = getattr(self._model, "precision", None)
        for index in range(len(data)):
            context.set_response_header(index, "Server-Timing", timing)
            context.set_response_header(index, REQUEST_ID_RESPONSE_HEADER, request_id)
            if isinstance(choice, Choice):
                context.set_response_header(index, HEADER, choice.header())
        if clock is not None:
            self._record(data, answers, context, headers, request_id, worker_s, clock)
        return answers

    @property
    def metrics_model(self) -> str:
        """The model label of the request's line (KENNEL_METRICS_MODEL)."""
        return self.settings.metrics_model

    @staticmethod
    def _request_id(headers: dict, context: Any) -> str:
        lowered = {str(key).lower(): value for key, value in headers.items()}
        for name in REQUEST_ID_HEADERS:
            value = str(lowered.get(name) or "").strip()
            if value and len(value) <= 128 and value.isprintable():
                return value
        try:
            return str(context.get_request_id(0)) or uuid.uuid4().hex
        except (AttributeError, IndexError, TypeError, KeyError):
            return uuid.uuid4().hex

    def _record(self, data: list, answers: list, context: Any, headers: dict, request_id: str, worker_s: float,
                clock: metrics.StageClock) -> None:
        """The request's log line, and the worker's counts; best effort: the answer is already made."""
        try:
            try:
                status = int(context.get_response_status(0)[0] or 200)
            except (AttributeError, IndexError, TypeError, ValueError):
                status = 200
            received = sum(len(request.get("body") or b"") for request in data)
            sent = sum(len(answer) if isinstance(answer, (str, bytes, bytearray)) else 0 for answer in answers)
            inference_id = next((str(v) for k, v in headers.items() if str(k).lower() == INFERENCE_ID_HEADER), None)
            line = metrics.request_line(request_id=request_id, inference_id=inference_id, status=status,
                                        model=self.metrics_model, worker_s=worker_s,
                                        stages_s=clock.seconds, received=received, sent=sent,
                                        emf=self.settings.metrics_emf)
            sys.stdout.write(line + "\n")
            sys.stdout.flush()  # a pipe to MMS: without it lines arrive in blocks, late
            self._counts.add(status, worker_s, clock.seconds, received, sent)
            self._counts_file.write(self._counts)
        except Exception:  # noqa: BLE001 (the client has its answer whatever happens here)
            log.exception("could not record request %s", request_id)

    def _run_handler_function(self, func: Any, *argv: Any) -> Any:
        stage = ("decode" if func == getattr(self, "_input_fn", None)
                 else "forward" if func == getattr(self, "_predict_fn", None)
                 else "render" if func == getattr(self, "_output_fn", None) else None)
        if stage is None:
            return super()._run_handler_function(func, *argv)
        with metrics.stage(stage):
            return super()._run_handler_function(func, *argv)

    def _transform(self, data: list, context: Any) -> list:
        try:
            for request in data:
                self._screen(request, request_headers(context))
        except RequestError as exc:
            return self.handle_error(context, exc, "")
        return super().transform(data, context)

    def _screen(self, request: dict, headers: dict) -> None:
        body = request.get("body")
        limit = self.settings.max_payload_bytes
        if body is not None and len(body) > limit:
            raise payload_too_large(f"the request body is {len(body)} bytes, more than the limit of {limit} bytes "
                                    f"({limit // MIB} MB, SAGEMAKER_MAX_PAYLOAD_IN_MB)")
        for canonical, spellings in (("Content-Type", ("content-type", "contenttype")), ("Accept", ("accept",))):
            for name in [key for key in headers if str(key).lower() in spellings]:
                headers[canonical] = headers.pop(name)
        if "Content-Type" not in headers:
            return
        media_type, params = parse_media_type(headers["Content-Type"])
        headers["Content-Type"] = media_type  # the toolkit compares it verbatim
        is_text = (media_type in content_types.UTF8_TYPES or media_type in JSONLINES_CONTENT_TYPES
                   or media_type.startswith("text/"))
        charset = params.get("charset")
        if is_text and charset and charset not in _TEXT_CHARSETS:
            raise unsupported_media_type(f"charset {charset!r} is not supported; send UTF-8")
        if media_type in content_types.UTF8_TYPES and isinstance(body, (bytes, bytearray)):
            try:
                bytes(body).decode("utf-8")
            except UnicodeDecodeError:
                raise bad_request(f"the {media_type} body is not valid UTF-8") from None

    @staticmethod
    def handle_error(context: Any, inference_exception: BaseInferenceToolkitError, trace: str) -> list[str]:
        status = int(inference_exception.status_code)
        # 507 (a multi-model load that memory cannot hold) is SageMaker's cue to unload and retry: it says why.
        if status >= 500 and status != HTTPStatus.INSUFFICIENT_STORAGE:
            log.error("request failed (HTTP %d): %s\n%s", status, inference_exception.message, trace)
            message = INTERNAL_ERROR_MESSAGE
        else:
            log.info("request refused (HTTP %d): %s", status, inference_exception.message)
            message = str(inference_exception.message)
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        context.set_response_status(code=status, phrase=phrase)
        context.set_response_content_type(0, "application/json")
        return [json.dumps({"error": message})]
