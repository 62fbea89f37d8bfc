"""Arbitrary events against the parser and the handler: a caller's event is answered 200 or 4xx, never
raised, never 5xx, never a traceback in the log.

The endpoint is the botocore Stubber, as in test_lambda.py: an event that parses is answered with scores,
so any 5xx here comes from the function itself. Nothing leaves the process.
"""
from __future__ import annotations

import base64
import io
import json
import logging

import pytest
from botocore.response import StreamingBody
from botocore.stub import Stubber
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kennel_lambda
from kennel_lambda_events import TARGET_MODEL, BadRequest, EndpointRequest, parse_event

ENDPOINT = "kennel-fuzz"
SCORES = b"[[0.5, -1.25, 3.0]]"
JPEG = b"\xff\xd8\xff\xe0" + bytes(16)
PNG = b"\x89PNG\r\n\x1a\n" + bytes(16)
FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# -- values: what JSON (and a direct invocation) can hold, the awkward ones made likely -------------------

huge_ints = st.integers(4000, 6000).map(lambda digits: 10 ** digits - 1)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), huge_ints, st.floats(), st.text(max_size=20),
                    st.sampled_from(["", " ", "\u00b2", "\u0663", "5", " 3 ", "-1", "1e3", "\ud800", "POST"]))
json_values = st.recursive(scalars, lambda children: st.one_of(
    st.lists(children, max_size=4),
    st.dictionaries(st.one_of(st.sampled_from(["url", "image", "top_k", "model", "http", "method", "content-type"]),
                              st.text(max_size=8)), children, max_size=4)), max_leaves=12)


def or_junk(strategy: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly the field's right kind of value, sometimes anything JSON can hold."""
    return st.one_of(strategy, strategy, json_values)


urls = st.one_of(st.sampled_from(["https://example.com/a.jpg", "http://10.0.0.1/dog.png", "ftp://x/y",
                                  "http://[::1/a", "http://example.com:99999/a", "https://", "file:///etc/passwd",
                                  "https://example.com/\ud800"]),
                 st.text(max_size=40).map(lambda path: "https://example.com/" + path))
images = st.one_of(st.sampled_from([JPEG, PNG, b"plain text"]), st.binary(max_size=64)).map(
    lambda data: base64.b64encode(data).decode("ascii"))
media_types = st.one_of(st.sampled_from(["image/jpeg", "image/png", "application/json", "application/x-image",
                                         "application/octet-stream", "text/plain", "Application/JSON; charset=utf-8",
                                         "image/" + "x" * 2000, "jpeg", ""]), st.text(max_size=20))
top_ks = st.one_of(st.integers(-5, 1005), st.from_regex(r"\s?[0-9]{1,6}\s?", fullmatch=True),
                   st.integers(4300, 5000).map(lambda digits: "9" * digits))
# Target models of a multi-model endpoint: good names, near misses (paths, other suffixes, spaces), any text.
good_models = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,20}[A-Za-z0-9])?\.tar\.gz", fullmatch=True)
models = st.one_of(good_models,
                   st.sampled_from(["rex", "../rex.tar.gz", "a/b.tar.gz", "rex.tar.gz\n", "-.tar.gz", ".tar.gz",
                                    "r" * 101 + ".tar.gz", "r\u00e9x.tar.gz", "rex.tar.gz\ud800"]),
                   st.text(max_size=30))
direct_fields = st.fixed_dictionaries({}, optional={
    "url": or_junk(urls), "image": or_junk(images), "content_type": or_junk(media_types), "top_k": or_junk(top_ks),
    "model": or_junk(models)})


def dumps_or_text(fields: dict) -> str:
    """The fields as a JSON text; one json.dumps refuses (a number past the digit limit) written by hand."""
    try:
        return json.dumps(fields)
    except ValueError:
        return '{"url": "https://example.com/a.jpg", "top_k": ' + "9" * 5000 + "}"


# -- proxy events: API Gateway REST (1.0), HTTP API (2.0), Function URLs -----------------------------------

json_bodies = st.one_of(direct_fields.map(dumps_or_text), st.text(max_size=40),
                        st.sampled_from(["[" * 100_000, '{"url": ' + "[" * 5000, "{}", "null", "\ud800",
                                         '{"url": "https://example.com/a.jpg", "n": ' + "1" * 4301 + "}"]))
bodies = st.one_of(json_bodies, json_bodies.map(lambda text: base64.b64encode(text.encode("utf-8", "replace"))
                                                .decode("ascii")), images, st.none())
methods = st.sampled_from(["POST", "post", "GET", "PUT", "", "X" * 500])
headers = st.dictionaries(st.sampled_from(["content-type", "Content-Type", "accept", "x-other"]), media_types,
                          max_size=3)
multi_headers = st.dictionaries(st.sampled_from(["content-type", "Content-Type"]),
                                st.lists(media_types, max_size=2), max_size=2)
query_values = st.one_of(top_ks.map(str), models)
queries = st.dictionaries(st.sampled_from(["top_k", "model", "other"]), query_values, max_size=3)
multi_queries = st.dictionaries(st.sampled_from(["top_k", "model", "other"]), st.lists(query_values, max_size=2),
                                max_size=3)
request_contexts = st.fixed_dictionaries({}, optional={
    "http": or_junk(st.fixed_dictionaries({}, optional={"method": or_junk(methods)})), "httpMethod": methods})
# What a field of a proxy event is replaced with: a value of its kind, or anything.
FIELD_VALUES = {"httpMethod": methods, "requestContext": request_contexts, "headers": headers,
                "multiValueHeaders": multi_headers, "queryStringParameters": queries,
                "multiValueQueryStringParameters": multi_queries, "body": bodies, "isBase64Encoded": st.booleans()}

good_direct = st.one_of(
    st.fixed_dictionaries({"url": st.sampled_from(["https://example.com/a.jpg", "http://images.example.com/rex"])},
                          optional={"top_k": st.one_of(st.integers(1, 1000), st.integers(1, 1000).map(str)),
                                    "model": good_models}),
    st.fixed_dictionaries({"image": st.sampled_from([JPEG, PNG]).map(lambda data: base64.b64encode(data).decode())},
                          optional={"content_type": st.sampled_from(["image/jpeg", "image/png"])}))


@st.composite
def proxy_events(draw) -> dict:
    """A well-formed event of one of the proxy payloads, up to three of its fields then replaced at random."""
    if draw(st.booleans()):
        body, content_type, encoded = base64.b64encode(JPEG).decode(), "image/jpeg", True
    else:
        body, content_type, encoded = json.dumps(draw(good_direct)), "application/json", False
    method = draw(st.sampled_from(["POST", "post"]))
    if draw(st.booleans()):  # REST API, payload 1.0
        event = {"resource": "/classify", "httpMethod": method, "headers": {"Content-Type": content_type},
                 "multiValueHeaders": {"Content-Type": [content_type]}, "queryStringParameters": None,
                 "multiValueQueryStringParameters": None, "requestContext": {"httpMethod": method, "stage": "prod"},
                 "body": body, "isBase64Encoded": encoded}
    else:  # HTTP API payload 2.0 and Function URLs
        event = {"version": "2.0", "rawQueryString": "", "headers": {"content-type": content_type},
                 "requestContext": {"http": {"method": method, "path": "/"}}, "body": body,
                 "isBase64Encoded": encoded}
    for field in draw(st.lists(st.sampled_from(sorted(FIELD_VALUES)), max_size=3, unique=True)):
        event[field] = draw(or_junk(FIELD_VALUES[field]))
    return event


events = st.one_of(direct_fields, good_direct, proxy_events(), json_values,
                   st.dictionaries(st.sampled_from(sorted(FIELD_VALUES) + ["url"]), json_values, max_size=4))


# -- the properties ------------------------------------------------------------------------------------

@FUZZ
@given(events)
def test_parse_event_answers_a_request_or_a_bad_request_and_nothing_else(event):
    try:
        request = parse_event(event)
    except BadRequest as refused:
        assert 400 <= refused.status < 500 and 0 < len(str(refused)) < 300
        return
    assert isinstance(request, EndpointRequest)
    assert isinstance(request.body, bytes) and request.body
    assert request.top_k is None or 1 <= request.top_k <= 1000
    request.content_type.encode("ascii")  # a header InvokeEndpoint can send
    assert request.target_model is None or TARGET_MODEL.fullmatch(request.target_model)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Context:
    def get_remaining_time_in_millis(self) -> int:
        return 30_000


@pytest.fixture(scope="module")
def stubbed_endpoint():
    """A sagemaker-runtime client whose InvokeEndpoint the Stubber answers, and the function's log records."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ENDPOINT_NAME", ENDPOINT)
        patch.delenv("DEFAULT_TARGET_MODEL", raising=False)
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        patch.setenv("AWS_ACCESS_KEY_ID", "testing")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        client = kennel_lambda._session.create_client("sagemaker-runtime", region_name="us-east-1")
        patch.setattr(kennel_lambda, "_client", client)
        records = Records()
        kennel_lambda.log.addHandler(records)
        try:
            yield client, records
        finally:
            kennel_lambda.log.removeHandler(records)


@FUZZ
@given(event=events)
def test_the_handler_answers_every_event_200_or_4xx_without_a_traceback(stubbed_endpoint, event):
    client, records = stubbed_endpoint
    records.records.clear()
    with Stubber(client) as stubber:  # a fresh one: a refused event leaves its answer unused
        stubber.add_response("invoke_endpoint", {"Body": StreamingBody(io.BytesIO(SCORES), len(SCORES)),
                                                 "ContentType": "application/json"})
        response = kennel_lambda.handler(event, Context())
    assert set(response) == {"statusCode", "headers", "body"}
    assert response["headers"]["Content-Type"] == "application/json"
    body = json.loads(response["body"])
    if response["statusCode"] == 200:
        assert response["body"] == SCORES.decode()
    else:
        assert 400 <= response["statusCode"] < 500, body
        assert set(body) == {"error"} and 0 < len(body["error"]) < 300
    assert not [record for record in records.records if record.exc_info or record.levelno >= logging.ERROR]


def test_the_strategies_reach_the_endpoint_as_well_as_refusals():
    """The properties above say little if every event were refused: some of each kind must get through."""
    reached = {"direct": 0, "proxy": 0}

    @settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(direct_fields.map(lambda event: ("direct", event)),
                     proxy_events().map(lambda event: ("proxy", event))))
    def count(kind_and_event):
        kind, event = kind_and_event
        try:
            parse_event(event)
        except BadRequest:
            return
        reached[kind] += 1

    count()
    assert reached["direct"] > 0 and reached["proxy"] > 0, reached

