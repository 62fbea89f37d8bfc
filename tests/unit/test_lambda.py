"""The handler: what it sends to InvokeEndpoint and how it answers each outcome (botocore Stubber).

The same paths over real HTTP, through the local runtime, are in test_lambda_runtime.py.
"""
from __future__ import annotations

import base64
import io
import json
import time

import pytest
from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError, ReadTimeoutError
from botocore.response import StreamingBody
from botocore.stub import Stubber

import kennel_lambda
import kennel_lambda_events

ENDPOINT = "kennel-test"
SCORES = [[0.5, -1.25, 3.0]]
TOP = [{"index": 2, "breed": "Airedale terrier", "class_name": "003.Airedale_terrier", "probability": 0.9}]
JPEG = b"\xff\xd8\xff\xe0" + bytes(32)


class Context:
    """The part of the Lambda context object the handler reads."""

    def __init__(self, remaining_ms: int = 30_000) -> None:
        self.remaining_ms = remaining_ms
        self.aws_request_id = "test-request"

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


@pytest.fixture(autouse=True)
def fresh_client_state(monkeypatch):
    """Each test starts like a new execution environment."""
    monkeypatch.setattr(kennel_lambda, "_client", None)
    monkeypatch.setattr(kennel_lambda, "_plan", None)
    monkeypatch.setenv("ENDPOINT_NAME", ENDPOINT)
    monkeypatch.delenv("DEFAULT_TARGET_MODEL", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")


@pytest.fixture
def stub(monkeypatch):
    client = kennel_lambda._session.create_client("sagemaker-runtime", region_name="us-east-1")
    monkeypatch.setattr(kennel_lambda, "_client", client)
    with Stubber(client) as stubber:
        yield stubber
        stubber.assert_no_pending_responses()


def ok_response(payload) -> dict:
    data = json.dumps(payload).encode()
    return {"Body": StreamingBody(io.BytesIO(data), len(data)), "ContentType": "application/json"}


def body_of(response: dict):
    assert response["headers"]["Content-Type"] == "application/json"
    return json.loads(response["body"])


# -- success ------------------------------------------------------------------------------

def test_url_event_returns_the_endpoints_scores_unchanged(stub):
    stub.add_response("invoke_endpoint", ok_response(SCORES), {
        "EndpointName": ENDPOINT, "Body": json.dumps({"url": "https://example.com/a.jpg"}).encode(),
        "ContentType": "application/json", "Accept": "application/json"})
    response = kennel_lambda.handler({"url": "https://example.com/a.jpg"}, Context())
    assert response["statusCode"] == 200
    assert body_of(response) == SCORES


def test_top_k_is_asked_of_the_endpoint_with_custom_attributes(stub):
    stub.add_response("invoke_endpoint", ok_response(TOP), {
        "EndpointName": ENDPOINT, "Body": JPEG, "ContentType": "image/jpeg", "Accept": "application/json",
        "CustomAttributes": "top_k=3"})
    event = {"image": base64.b64encode(JPEG).decode(), "top_k": 3}
    response = kennel_lambda.handler(event, Context())
    assert response["statusCode"] == 200 and body_of(response) == TOP


def test_function_url_event_with_raw_image(stub):
    stub.add_response("invoke_endpoint", ok_response(SCORES), {
        "EndpointName": ENDPOINT, "Body": JPEG, "ContentType": "image/jpeg", "Accept": "application/json"})
    event = {"version": "2.0", "requestContext": {"http": {"method": "POST"}},
             "headers": {"content-type": "image/jpeg"}, "body": base64.b64encode(JPEG).decode(),
             "isBase64Encoded": True}
    assert body_of(kennel_lambda.handler(event, Context())) == SCORES


def test_the_answer_body_is_the_endpoints_text_byte_for_byte(stub):
    text = '[[1.0000001, -2e-05]]'
    stub.add_response("invoke_endpoint", {"Body": StreamingBody(io.BytesIO(text.encode()), len(text)),
                                          "ContentType": "application/json"})
    assert kennel_lambda.handler({"url": "https://example.com/a.jpg"}, Context())["body"] == text


# -- multi-model endpoints: the target model ----------------------------------------------------

def expect_invocation(stub, target_model: str | None) -> None:
    params = {"EndpointName": ENDPOINT, "Body": json.dumps({"url": "https://example.com/a.jpg"}).encode(),
              "ContentType": "application/json", "Accept": "application/json"}
    if target_model is not None:
        params["TargetModel"] = target_model
    stub.add_response("invoke_endpoint", ok_response(SCORES), params)


@pytest.mark.parametrize("event", [
    pytest.param({"url": "https://example.com/a.jpg", "model": "rex-v2.tar.gz"}, id="direct-field"),
    pytest.param({"version": "2.0", "requestContext": {"http": {"method": "POST"}},
                  "headers": {"content-type": "application/json"}, "queryStringParameters": {"model": "rex-v2.tar.gz"},
                  "body": json.dumps({"url": "https://example.com/a.jpg"}), "isBase64Encoded": False},
                 id="query-string"),
])
def test_the_model_a_caller_names_is_the_target_model(stub, event):
    expect_invocation(stub, "rex-v2.tar.gz")
    response = kennel_lambda.handler(event, Context())
    assert response["statusCode"] == 200 and body_of(response) == SCORES


def test_the_functions_default_target_model_applies_unless_the_caller_names_one(stub, monkeypatch):
    monkeypatch.setenv("DEFAULT_TARGET_MODEL", "kennel-a.tar.gz")
    expect_invocation(stub, "kennel-a.tar.gz")
    assert kennel_lambda.handler({"url": "https://example.com/a.jpg"}, Context())["statusCode"] == 200
    expect_invocation(stub, "kennel-b.tar.gz")
    event = {"url": "https://example.com/a.jpg", "model": "kennel-b.tar.gz"}
    assert kennel_lambda.handler(event, Context())["statusCode"] == 200


def test_without_a_model_or_a_default_no_target_model_is_sent(stub, monkeypatch):
    monkeypatch.setenv("DEFAULT_TARGET_MODEL", " ")  # set but empty: no default
    expect_invocation(stub, None)  # the Stubber refuses any parameter it was not told of
    assert kennel_lambda.handler({"url": "https://example.com/a.jpg"}, Context())["statusCode"] == 200


@pytest.mark.parametrize("model", ["rex", "../rex.tar.gz", "a/rex.tar.gz", "rex.tar.gz ", "-rex.tar.gz",
                                   "r" * 101 + ".tar.gz", "", 7, None, ["rex.tar.gz"], "r\u00e9x.tar.gz"])
def test_an_invalid_model_is_400_and_the_endpoint_is_not_called(stub, model):
    response = kennel_lambda.handler({"url": "https://example.com/a.jpg", "model": model}, Context())
    assert response["statusCode"] == 400
    assert body_of(response)["error"].startswith("model must name one of the endpoint's models")


def test_an_invalid_default_target_model_is_a_configuration_error(stub, monkeypatch):
    monkeypatch.setenv("DEFAULT_TARGET_MODEL", "models/rex.tar.gz")
    response = kennel_lambda.handler({"url": "https://example.com/a.jpg"}, Context())
    assert response["statusCode"] == 500 and "DEFAULT_TARGET_MODEL" in body_of(response)["error"]


def test_a_multi_model_endpoint_asked_without_a_model_is_400(stub):
    stub.add_client_error("invoke_endpoint", service_error_code="ValidationError", http_status_code=400,
                          service_message="Request 186633a1 is missing a target model header.")
    response = kennel_lambda.handler({"url": "https://example.com/a.jpg"}, Context())
    assert response["statusCode"] == 400 and '"model"' in body_of(response)["error"]


NOT_MULTI_MODEL = f"Endpoint {ENDPOINT} is not a multi-model endpoint and does not support target model header."
NO_SUCH_MODEL = ("Failed to download model data(bucket: kennel-data, key: models/rex.tar.gz). Please ensure that "
                 "there is an object located at the URL and that the role passed to CreateModel has permissions "
                 "to download the model.")


@pytest.mark.parametrize("message, status, error", [
    (NOT_MULTI_MODEL, 400, "the endpoint serves one model: leave out \"model\""),
    (NO_SUCH_MODEL, 404, "the endpoint has no model rex.tar.gz that it can load"),
])
def test_the_runtimes_refusal_of_a_callers_model_is_the_callers_to_fix(stub, message, status, error):
    stub.add_client_error("invoke_endpoint", service_error_code="ValidationError", http_status_code=400,
                          service_message=message)
    response = kennel_lambda.handler({"url": "https://example.com/a.jpg", "model": "rex.tar.gz"}, Context())
    assert response["statusCode"] == status and body_of(response) == {"error": error}


@pytest.mark.parametrize("message", [NOT_MULTI_MODEL, NO_SUCH_MODEL])
def test_the_runtimes_refusal_of_the_default_model_is_a_configuration_error(stub, monkeypatch, message):
    monkeypatch.setenv("DEFAULT_TARGET_MODEL", "rex.tar.gz")
    stub.add_client_error("invoke_endpoint", service_error_code="ValidationError", http_status_code=400,
                          service_message=message)
    response = kennel_lambda.handler({"url": "https://example.com/a.jpg"}, Context())
    assert response["statusCode"] == 500 and "DEFAULT_TARGET_MODEL" in body_of(response)["error"]


def test_the_log_line_names_the_target_model(stub, caplog):
    expect_invocation(stub, "rex.tar.gz")
    with caplog.at_level("INFO", logger="kennel_lambda"):
        kennel_lambda.handler({"url": "https://example.com/a.jpg", "model": "rex.tar.gz"}, Context())
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.getMessage().startswith("{")]
    assert lines[-1]["model"] == "rex.tar.gz" and lines[-1]["status"] == 200


# -- bad events and configuration ------------------------------------------------------------

def test_bad_event_is_400_and_the_endpoint_is_not_called(stub):
    response = kennel_lambda.handler({"picture": "x"}, Context())
    assert response["statusCode"] == 400
    assert "exactly one of" in body_of(response)["error"]


def test_missing_endpoint_name_is_a_configuration_error(monkeypatch):
    monkeypatch.delenv("ENDPOINT_NAME")
    response = kennel_lambda.handler({"url": "https://example.com/a.jpg"}, Context())
    assert response["statusCode"] == 500
    assert "ENDPOINT_NAME" in body_of(response)["error"]


def test_invalid_endpoint_name_is_a_configuration_error(monkeypatch):
    monkeypatch.setenv("ENDPOINT_NAME", "arn:aws:sagemaker:us-east-1:1:endpoint/x")
    response = kennel_lambda.handler({"url": "https://example.com/a.jpg"}, Context())
    assert response["statusCode"] == 500 and "not a SageMaker endpoint name" in body_of(response)["error"]


def test_missing_region_is_a_configuration_error(monkeypatch):
    for name in ("AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    response = kennel_lambda.handler({"url": "https://example.com/a.jpg"}, Context())
    assert response["statusCode"] == 500 and "region" in body_of(response)["error"]


def test_missing_credentials_are_a_configuration_error(monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no look-up of an instance role
    fresh = kennel_lambda.botocore.session.get_session()
    monkeypatch.setattr(kennel_lambda, "_session", fresh)
    response = kennel_lambda.handler({"url": "https://example.com/a.jpg"}, Context())
    assert response["statusCode"] == 500 and "credentials" in body_of(response)["error"]


def test_unexpected_failure_is_answered_not_raised(monkeypatch):
    def broken(*_args, **_kwargs):
        raise KeyError("surprise")
    monkeypatch.setattr(kennel_lambda, "invoke", broken)
    response = kennel_lambda.handler({"url": "https://example.com/a.jpg"}, Context())
    assert response["statusCode"] == 500
    assert body_of(response) == {"error": "internal error in the function"}


# -- endpoint failures ------------------------------------------------------------------------

def model_error(stub, status: int, original: str, message: str | None = None) -> None:
    stub.add_client_error("invoke_endpoint", service_error_code="ModelError", http_status_code=424,
                          service_message=message or f'Received client error ({status}) from primary with message '
                                                     f'"{original}". See the log group for more information.',
                          modeled_fields={"OriginalStatusCode": status, "OriginalMessage": original})


@pytest.mark.parametrize("status", [400, 413, 415, 422])
def test_the_models_own_4xx_is_passed_on_with_its_message(stub, status):
    model_error(stub, status, json.dumps({"error": "the bytes are not an image in a supported format"}))
    response = kennel_lambda.handler({"url": "https://example.com/a.jpg"}, Context())
    assert response["statusCode"] == status
    assert body_of(response) == {"error": "the bytes are not an image in a supported format"}


def test_a_plain_text_model_message_is_passed_on_short(stub):
    model_error(stub, 400, "x" * 5000)
    response = kennel_lambda.handler({"url": "https://example.com/a.jpg"}, Context())
    assert response["statusCode"] == 400 and body_of(response)["error"] == "x" * 500


def test_the_models_5xx_is_502_without_its_traceback(stub):
    model_error(stub, 500, "Traceback (most recent call last): secret internals")
    response = kennel_lambda.handler({"url": "https://example.com/a.jpg"}, Context())
    assert response["statusCode"] == 502
    assert "Traceback" not in response["body"] and body_of(response)["error"] == "the model failed (500)"


@pytest.mark.parametrize("status", [429, 503])
def test_an_overloaded_model_server_is_503_with_retry_after(stub, status):
    model_error(stub, status, "all workers are busy")
    response = kennel_lambda.handler({"url": "https://example.com/a.jpg"}, Context())
    assert response["statusCode"] == 503 and response["headers"]["Retry-After"] == "1"


def test_a_container_timeout_is_504(stub):
    model_error(stub, 0, "", message='Received server error (0) from primary with message "Your invocation '
                                     'timed out while waiting for a response from container primary."')
    response = kennel_lambda.handler({"url": "https://example.com/a.jpg"}, Context())
    assert response["statusCode"] == 504


@pytest.mark.parametrize("code, http_status", [("ThrottlingException", 400), ("ModelNotReadyException", 429),
                                               ("ServiceUnavailable", 503)])
def test_throttling_and_not_ready_are_503_with_retry_after(stub, code, http_status):
    stub.add_client_error("invoke_endpoint", service_error_code=code, http_status_code=http_status,
                          service_message="slow down")
    response = kennel_lambda.handler({"url": "https://example.com/a.jpg"}, Context())
    assert response["statusCode"] == 503 and response["headers"]["Retry-After"] == "1"


def test_missing_endpoint_is_502_naming_it(stub):
    stub.add_client_error("invoke_endpoint", service_error_code="ValidationError", http_status_code=400,
                          service_message=f"Endpoint {ENDPOINT} of account 123456789012 not found.")
    response = kennel_lambda.handler({"url": "https://example.com/a.jpg"}, Context())
    assert response["statusCode"] == 502 and ENDPOINT in body_of(response)["error"]


@pytest.mark.parametrize("code, http_status", [("InternalFailure", 500), ("InternalDependencyException", 530)])
def test_runtime_5xx_is_502(stub, code, http_status):
    stub.add_client_error("invoke_endpoint", service_error_code=code, http_status_code=http_status)
    response = kennel_lambda.handler({"url": "https://example.com/a.jpg"}, Context())
    assert response["statusCode"] == 502 and code in body_of(response)["error"]


@pytest.mark.parametrize("code", ["AccessDeniedException", "UnrecognizedClientException", "ExpiredTokenException"])
def test_access_denied_is_a_configuration_error(stub, code):
    stub.add_client_error("invoke_endpoint", service_error_code=code, http_status_code=403,
                          service_message="not authorized to perform: sagemaker:InvokeEndpoint")
    response = kennel_lambda.handler({"url": "https://example.com/a.jpg"}, Context())
    assert response["statusCode"] == 500 and "may not invoke" in body_of(response)["error"]


def test_a_non_json_answer_is_502(stub):
    stub.add_response("invoke_endpoint", {"Body": StreamingBody(io.BytesIO(b"<html>"), 6), "ContentType": "text/html"})
    response = kennel_lambda.handler({"url": "https://example.com/a.jpg"}, Context())
    assert response["statusCode"] == 502 and "not JSON" in body_of(response)["error"]


@pytest.mark.parametrize("error, status", [
    (ReadTimeoutError(endpoint_url="http://runtime"), 504),
    (ConnectTimeoutError(endpoint_url="http://runtime"), 504),
    (EndpointConnectionError(endpoint_url="http://runtime"), 502),
])
def test_transport_failures(monkeypatch, error, status):
    class FailingClient:
        def invoke_endpoint(self, **_kwargs):
            raise error
    monkeypatch.setattr(kennel_lambda, "_client", FailingClient())
    response = kennel_lambda.handler({"url": "https://example.com/a.jpg"}, Context())
    assert response["statusCode"] == status and "error" in body_of(response)


# -- client and timeouts ----------------------------------------------------------------------

def test_client_is_created_once_per_execution_environment():
    first = kennel_lambda.runtime_client(29.0)
    assert kennel_lambda.runtime_client(5.0) is first


def test_client_timeouts_fit_the_functions_remaining_time():
    client = kennel_lambda.runtime_client(kennel_lambda.budget_seconds(Context(30_000)))
    config = client.meta.config
    worst_case = config.retries["total_max_attempts"] * (config.connect_timeout + config.read_timeout) + 3
    assert config.retries["mode"] == "standard"
    assert worst_case <= 30


@pytest.mark.parametrize("remaining_s", [1, 3, 6, 10, 30, 60, 300, 900])
def test_timeout_plan_worst_case_fits_inside_the_budget(remaining_s):
    budget = kennel_lambda.budget_seconds(Context(remaining_s * 1000))
    plan = kennel_lambda.TimeoutPlan.for_budget(budget)
    backoff = 2 ** (plan.attempts - 1) - 1
    assert budget < remaining_s
    assert plan.attempts * plan.attempt_s + backoff <= budget + 1e-6
    assert plan.read_s <= kennel_lambda.MAX_READ_TIMEOUT_S
    assert 1 <= plan.attempts <= kennel_lambda.MAX_ATTEMPTS


def test_default_three_second_function_gets_one_attempt_with_most_of_the_time():
    plan = kennel_lambda.TimeoutPlan.for_budget(kennel_lambda.budget_seconds(Context(3000)))
    assert plan.attempts == 1 and 2.0 <= plan.read_s < 3.0


def test_without_a_context_the_local_budget_applies():
    assert kennel_lambda.budget_seconds(None) < kennel_lambda.LOCAL_BUDGET_S


def test_every_answer_is_logged_without_the_payload(stub, caplog):
    stub.add_response("invoke_endpoint", ok_response(SCORES))
    secret = base64.b64encode(JPEG + b"secret-pixels").decode()
    with caplog.at_level("INFO", logger="kennel_lambda"):
        started = time.monotonic()
        kennel_lambda.handler({"image": secret}, Context())
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.getMessage().startswith("{")]
    assert lines[-1]["status"] == 200 and lines[-1]["source"] == "image"
    assert 0 <= lines[-1]["ms"] <= (time.monotonic() - started) * 1000 + 1
    assert secret not in caplog.text


# -- malformed events: 4xx, a short reason, no traceback in the log --------------------------------

def proxy_event(**fields) -> dict:
    event = {"version": "2.0", "headers": {"content-type": "application/json"},
             "requestContext": {"http": {"method": "POST"}}, "body": json.dumps({"url": "https://example.com/a.jpg"}),
             "isBase64Encoded": False}
    return {**event, **fields}


MALFORMED_EVENTS = [
    pytest.param(proxy_event(body="[" * 100_000), id="deeply-nested-body"),
    pytest.param(proxy_event(body='{"url": "https://example.com/a.jpg", "top_k": %s}' % ("9" * 5000)),
                 id="5000-digit-top_k-in-body"),
    pytest.param(proxy_event(body='{"url": "https://example.com/a.jpg", "n": %s}' % ("1" * 4301)),
                 id="4301-digit-number-in-body"),
    pytest.param({"url": "https://example.com/a.jpg", "top_k": "\u00b2"}, id="top_k-superscript-two"),
    pytest.param({"url": "https://example.com/a.jpg", "top_k": "9" * 5000}, id="top_k-5000-digits"),
    pytest.param({"url": "https://example.com/a.jpg", "top_k": 10 ** 5000}, id="top_k-huge-int"),
    pytest.param({"url": "https://example.com/a.jpg", "top_k": 2.0}, id="top_k-float"),
    pytest.param({"url": "https://example.com/a.jpg", "top_k": True}, id="top_k-bool"),
    pytest.param({"url": "https://example.com/a.jpg", "top_k": -1}, id="top_k-negative"),
    pytest.param({"url": "https://example.com/a.jpg", "top_k": 0}, id="top_k-zero"),
    pytest.param(proxy_event(queryStringParameters={"top_k": "\u00b2"}), id="query-top_k-superscript-two"),
    pytest.param({"requestContext": "x"}, id="requestContext-string"),
    pytest.param({"requestContext": [1]}, id="requestContext-list"),
    pytest.param({"requestContext": 7}, id="requestContext-int"),
    pytest.param({"requestContext": None}, id="requestContext-null"),
    pytest.param(proxy_event(requestContext={"http": "POST"}), id="requestContext-http-string"),
    pytest.param(proxy_event(httpMethod=["POST"]), id="httpMethod-list"),
    pytest.param(proxy_event(headers=["content-type"]), id="headers-list"),
    pytest.param(proxy_event(headers={"content-type": 1}), id="header-value-int"),
    pytest.param(proxy_event(headers={1: "application/json"}), id="header-name-int"),
    pytest.param(proxy_event(multiValueHeaders={"content-type": {"a": 1}}), id="multiValueHeaders-dict-value"),
    pytest.param(proxy_event(multiValueHeaders="content-type"), id="multiValueHeaders-string"),
    pytest.param(proxy_event(body=5), id="body-int"),
    pytest.param(proxy_event(body="!!!", isBase64Encoded=True), id="invalid-base64"),
    pytest.param(proxy_event(isBase64Encoded="yes"), id="isBase64Encoded-string"),
    pytest.param(proxy_event(queryStringParameters="top_k=3"), id="queryStringParameters-string"),
    pytest.param(proxy_event(multiValueQueryStringParameters={"top_k": 3}), id="multiValueQuery-int"),
    pytest.param(proxy_event(body='{"url": "\ud800"}'), id="lone-surrogate"),
    pytest.param({"image": base64.b64encode(JPEG).decode(), "content_type": "image/" + "x" * 2000},
                 id="content_type-longer-than-the-runtime-takes"),
    pytest.param([{"url": "https://example.com/a.jpg"}], id="event-list"),
    pytest.param("https://example.com/a.jpg", id="event-string"),
    pytest.param(None, id="event-null"),
]


@pytest.mark.parametrize("event", MALFORMED_EVENTS)
def test_a_malformed_event_is_4xx_with_a_short_reason_and_no_traceback(stub, caplog, event):
    with caplog.at_level("DEBUG", logger="kennel_lambda"):
        response = kennel_lambda.handler(event, Context())
    assert 400 <= response["statusCode"] < 500
    error = body_of(response)["error"]
    assert isinstance(error, str) and 0 < len(error) < 300
    assert not any(record.exc_info for record in caplog.records)
    assert "Traceback" not in caplog.text and "Traceback" not in response["body"]


# -- what the endpoint answers never breaks the function ---------------------------------------------

def test_a_deeply_nested_endpoint_answer_is_502_not_a_crash(stub, caplog):
    nested = b"[" * 100_000
    stub.add_response("invoke_endpoint", {"Body": StreamingBody(io.BytesIO(nested), len(nested)),
                                          "ContentType": "application/json"})
    with caplog.at_level("DEBUG", logger="kennel_lambda"):
        response = kennel_lambda.handler({"url": "https://example.com/a.jpg"}, Context())
    assert response["statusCode"] == 502 and "not JSON" in body_of(response)["error"]
    assert not any(record.exc_info for record in caplog.records)


def test_a_deeply_nested_model_message_is_passed_on_as_short_text(stub):
    model_error(stub, 400, "[" * 100_000)
    response = kennel_lambda.handler({"url": "https://example.com/a.jpg"}, Context())
    assert response["statusCode"] == 400 and body_of(response)["error"] == "[" * 500


def test_the_models_refusal_is_relayed_as_it_is_without_detail_of_the_functions_own(stub):
    """The container words its refusals; the function adds nothing about where the endpoint runs."""
    model_error(stub, 400, json.dumps({"error": "the image URL is not allowed"}))
    response = kennel_lambda.handler({"url": "https://example.com/a.jpg"}, Context())
    assert response["statusCode"] == 400 and body_of(response) == {"error": "the image URL is not allowed"}


def test_a_request_botocore_refuses_to_send_is_a_bug_of_the_function(monkeypatch, caplog):
    """parse_event builds every parameter; one botocore refuses is the function's fault: 500 with
    a traceback in the log, not 502 'could not be reached'."""
    # botocore validates before sending; the closed local port keeps any slip off the network.
    client = kennel_lambda._session.create_client("sagemaker-runtime", region_name="us-east-1",
                                                  endpoint_url="http://127.0.0.1:9")
    monkeypatch.setattr(kennel_lambda, "_client", client)
    wrong_type = kennel_lambda_events.EndpointRequest(JPEG, 7, None, "image")  # type: ignore[arg-type]
    monkeypatch.setattr(kennel_lambda, "parse_event", lambda _event: wrong_type)
    with caplog.at_level("DEBUG", logger="kennel_lambda"):
        response = kennel_lambda.handler({"image": "ignored"}, Context())
    assert response["statusCode"] == 500 and body_of(response) == {"error": "internal error in the function"}
    assert any(record.exc_info for record in caplog.records)
