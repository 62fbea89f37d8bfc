"""Every event shape the function accepts, and the reason it gives for each one it refuses."""
from __future__ import annotations

import base64
import json

import pytest

from kennel_lambda_events import MAX_BODY_BYTES, BadRequest, parse_event

JPEG = b"\xff\xd8\xff\xe0" + b"\x00\x10JFIF" + bytes(range(256)) * 4
PNG = b"\x89PNG\r\n\x1a\n" + bytes(64)
URL = "https://images.example.com/dogs/rex.jpg"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def rest_v1(body: str | None, content_type: str | None = "application/json", encoded: bool = False,
            query: dict | None = None, method: str = "POST") -> dict:
    """An API Gateway REST API (payload 1.0) proxy event, trimmed to the fields that matter."""
    headers = {"Content-Type": content_type} if content_type else {}
    return {"resource": "/classify", "path": "/classify", "httpMethod": method, "headers": headers,
            "multiValueHeaders": {k: [v] for k, v in headers.items()}, "queryStringParameters": query,
            "multiValueQueryStringParameters": {k: [v] for k, v in (query or {}).items()} or None,
            "requestContext": {"resourcePath": "/classify", "httpMethod": method, "stage": "prod"},
            "body": body, "isBase64Encoded": encoded}


def http_v2(body: str | None, content_type: str | None = "application/json", encoded: bool = False,
            query: dict | None = None, method: str = "POST") -> dict:
    """An HTTP API (payload 2.0) or Function URL event: lower-case headers, rawQueryString."""
    headers = {"content-type": content_type} if content_type else {}
    raw_query = "&".join(f"{k}={v}" for k, v in (query or {}).items())
    event = {"version": "2.0", "routeKey": "$default", "rawPath": "/", "rawQueryString": raw_query,
             "headers": headers, "requestContext": {"http": {"method": method, "path": "/"}},
             "body": body, "isBase64Encoded": encoded}
    if query:
        event["queryStringParameters"] = query
    return event


# -- direct invocations --------------------------------------------------------------------

def test_original_url_event_is_forwarded_as_json():
    request = parse_event({"url": URL})
    assert request.content_type == "application/json"
    assert json.loads(request.body) == {"url": URL}
    assert request.top_k is None and request.source == "url"


def test_image_event_decodes_base64_and_keeps_the_declared_type():
    request = parse_event({"image": b64(PNG), "content_type": "image/png"})
    assert request.body == PNG and request.content_type == "image/png" and request.source == "image"


@pytest.mark.parametrize("data, expected", [(JPEG, "image/jpeg"), (PNG, "image/png"),
                                            (b"GIF89a" + bytes(10), "image/gif"),
                                            (b"RIFF\x00\x00\x00\x00WEBPVP8 " + bytes(8), "image/webp")])
def test_image_event_without_content_type_is_recognised_from_its_bytes(data, expected):
    assert parse_event({"image": b64(data)}).content_type == expected


def test_image_event_accepts_a_data_uri_and_wrapped_base64():
    wrapped = "\n".join(b64(JPEG)[i:i + 76] for i in range(0, len(b64(JPEG)), 76))
    assert parse_event({"image": wrapped}).body == JPEG
    request = parse_event({"image": "data:image/png;base64," + b64(PNG)})
    assert request.body == PNG and request.content_type == "image/png"


@pytest.mark.parametrize("top_k", [5, "5", " 3 "])
def test_top_k_field_is_read(top_k):
    assert parse_event({"url": URL, "top_k": top_k}).top_k == int(str(top_k).strip())


@pytest.mark.parametrize("event, reason", [
    ({}, "exactly one of"),
    ({"url": URL, "image": b64(JPEG)}, "exactly one of"),
    ({"url": ""}, "non-empty string"),
    ({"url": 42}, "non-empty string"),
    ({"url": "ftp://example.com/dog.jpg"}, "http:// or https://"),
    ({"url": "file:///etc/passwd"}, "http:// or https://"),
    ({"url": "https://"}, "http:// or https://"),
    ({"url": "https://example.com/" + "a" * 3000}, "longer than"),
    ({"image": ""}, "non-empty base64"),
    ({"image": "not base64!"}, "not valid base64"),
    ({"image": b64(bytes(100))}, "give its content_type"),
    ({"image": b64(JPEG), "content_type": "jpeg"}, "not a media type"),
    ({"image": b64(JPEG), "content_type": 7}, "must be a string"),
    ({"url": URL, "top_k": 0}, "top_k must be"),
    ({"url": URL, "top_k": True}, "top_k must be"),
    ({"url": URL, "top_k": 2.5}, "top_k must be"),
    ({"url": URL, "top_k": "five"}, "top_k must be"),
    ({"url": URL, "top_k": 100_000}, "top_k must be"),
    ([URL], "must be a JSON object"),
    ("https://example.com/dog.jpg", "must be a JSON object"),
    (None, "must be a JSON object"),
])
def test_bad_direct_events_are_refused_with_the_reason(event, reason):
    with pytest.raises(BadRequest) as raised:
        parse_event(event)
    assert reason in str(raised.value)
    assert 400 <= raised.value.status < 500


def test_an_image_over_the_invoke_endpoint_limit_is_413():
    with pytest.raises(BadRequest) as raised:
        parse_event({"image": b64(JPEG + bytes(MAX_BODY_BYTES))})
    assert raised.value.status == 413 and "6 MB" in str(raised.value)


def test_unrecognised_bytes_without_content_type_are_415():
    with pytest.raises(BadRequest) as raised:
        parse_event({"image": b64(b"plain text, not an image")})
    assert raised.value.status == 415


@pytest.mark.parametrize("model", ["rex.tar.gz", "kennel-2024.06_b.tar.gz", "a.tar.gz", "R" * 100 + ".tar.gz"])
def test_model_field_names_the_target_model(model):
    assert parse_event({"url": URL, "model": model}).target_model == model
    assert parse_event({"image": b64(JPEG), "model": model}).target_model == model


def test_without_model_there_is_no_target_model():
    assert parse_event({"url": URL}).target_model is None


@pytest.mark.parametrize("model", ["rex", "rex.tgz", "rex.tar.gz/", "../rex.tar.gz", "models/rex.tar.gz",
                                   ".tar.gz", "-rex.tar.gz", "rex-.tar.gz", "rex .tar.gz", " rex.tar.gz",
                                   "rex.tar.gz\n", "R" * 101 + ".tar.gz", "r\u00e9x.tar.gz", "", 5, None, True,
                                   ["rex.tar.gz"], {"name": "rex.tar.gz"}])
def test_a_model_that_is_not_a_plain_model_file_name_is_refused(model):
    with pytest.raises(BadRequest) as raised:
        parse_event({"url": URL, "model": model})
    assert raised.value.status == 400 and "model must name one of the endpoint's models" in str(raised.value)
    assert len(str(raised.value)) < 300


# -- proxy events: API Gateway REST (1.0), HTTP API (2.0), Function URLs ------------------------

@pytest.mark.parametrize("make", [rest_v1, http_v2])
def test_proxy_json_body_with_url(make):
    request = parse_event(make(json.dumps({"url": URL})))
    assert json.loads(request.body) == {"url": URL} and request.content_type == "application/json"


@pytest.mark.parametrize("make", [rest_v1, http_v2])
def test_proxy_base64_encoded_json_body(make):
    request = parse_event(make(b64(json.dumps({"image": b64(PNG)}).encode()), encoded=True))
    assert request.body == PNG and request.content_type == "image/png"


@pytest.mark.parametrize("make", [rest_v1, http_v2])
def test_proxy_raw_image_body_keeps_its_content_type(make):
    request = parse_event(make(b64(JPEG), content_type="image/jpeg", encoded=True))
    assert request.body == JPEG and request.content_type == "image/jpeg" and request.source == "raw-image"


@pytest.mark.parametrize("make", [rest_v1, http_v2])
def test_proxy_octet_stream_body_is_recognised_from_its_bytes(make):
    request = parse_event(make(b64(PNG), content_type="application/octet-stream", encoded=True))
    assert request.content_type == "image/png"


@pytest.mark.parametrize("make", [rest_v1, http_v2])
def test_proxy_query_string_asks_for_top_k(make):
    request = parse_event(make(b64(JPEG), content_type="image/jpeg", encoded=True, query={"top_k": "3"}))
    assert request.top_k == 3


@pytest.mark.parametrize("make", [rest_v1, http_v2])
def test_proxy_query_string_names_the_model(make):
    request = parse_event(make(b64(JPEG), content_type="image/jpeg", encoded=True, query={"model": "rex.tar.gz"}))
    assert request.target_model == "rex.tar.gz"
    with pytest.raises(BadRequest, match="model must name"):
        parse_event(make(b64(JPEG), content_type="image/jpeg", encoded=True, query={"model": "../x.tar.gz"}))


def test_json_body_model_wins_over_the_query_string():
    request = parse_event(http_v2(json.dumps({"url": URL, "model": "a.tar.gz"}), query={"model": "b.tar.gz"}))
    assert request.target_model == "a.tar.gz"


def test_json_body_top_k_wins_over_the_query_string():
    request = parse_event(http_v2(json.dumps({"url": URL, "top_k": 2}), query={"top_k": "7"}))
    assert request.top_k == 2


def test_content_type_parameters_and_case_are_ignored():
    request = parse_event(http_v2(json.dumps({"url": URL}), content_type="Application/JSON; charset=utf-8"))
    assert json.loads(request.body) == {"url": URL}


def test_text_body_without_content_type_is_read_as_json():
    assert json.loads(parse_event(http_v2(json.dumps({"url": URL}), content_type=None)).body) == {"url": URL}


def test_rest_api_multi_value_headers_alone_are_enough():
    event = rest_v1(b64(JPEG), content_type=None, encoded=True)
    event["multiValueHeaders"] = {"Content-Type": ["image/jpeg"]}
    assert parse_event(event).content_type == "image/jpeg"


@pytest.mark.parametrize("event, status, reason", [
    (http_v2(None), 400, "no body"),
    (rest_v1(""), 400, "no body"),
    (http_v2("{not json"), 400, "not valid JSON"),
    (http_v2(json.dumps([1, 2])), 400, "must be an object"),
    (http_v2(json.dumps({"url": URL}), method="GET"), 405, "POST"),
    (rest_v1(json.dumps({"url": URL}), method="PUT"), 405, "POST"),
    (http_v2("hello", content_type="text/plain"), 415, "not supported"),
    (rest_v1("\ufffd\ufffdJFIF", content_type="image/jpeg"), 400, "binaryMediaTypes"),
    (http_v2("!!!", content_type="image/jpeg", encoded=True), 400, "not valid base64"),
    (http_v2(json.dumps({"url": URL}), query={"top_k": "-1"}), 400, "top_k must be"),
])
def test_bad_proxy_events_are_refused_with_the_reason(event, status, reason):
    with pytest.raises(BadRequest) as raised:
        parse_event(event)
    assert raised.value.status == status
    assert reason in str(raised.value)


# -- malformed events: each is the caller's fault, never an exception of another kind -------------

def direct_proxy(**fields) -> dict:
    """A proxy event with a JSON body asking for URL, its fields replaced by the test's."""
    return {**http_v2(json.dumps({"url": URL})), **fields}


@pytest.mark.parametrize("top_k", [
    "\u00b2", "\u0663", pytest.param("9" * 5000, id="5000-digit-string"), "1" * 5, 5.0, 2.5, True, False, -3, 0,
    pytest.param(10 ** 5000, id="5000-digit-int"), None, [5], {"k": 5}, "", " ", "+5", "5e1", "0x5"])
def test_top_k_that_is_not_a_small_ascii_whole_number_is_refused(top_k):
    events = [{"url": URL, "top_k": top_k}]
    if isinstance(top_k, str):  # a query string only ever holds text
        events.append(http_v2(json.dumps({"url": URL}), query={"top_k": top_k}))
    for event in events:
        with pytest.raises(BadRequest) as raised:
            parse_event(event)
        assert raised.value.status == 400 and "top_k must be" in str(raised.value)


@pytest.mark.parametrize("body, reason", [
    pytest.param("[" * 100_000, "nested too deeply", id="open-arrays"),
    pytest.param('{"url": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply", id="nested-url"),
    pytest.param('{"url": "%s", "top_k": %s}' % (URL, "9" * 5000), "number", id="5000-digit-top_k"),
    pytest.param('{"url": "%s", "other": %s}' % (URL, "9" * 4301), "number", id="4301-digit-field"),
    pytest.param('{"url": "\ud800"}', "not valid", id="lone-surrogate-in-json"),
    pytest.param("\ud800", "not valid", id="lone-surrogate-body"),
])
def test_json_bodies_python_cannot_read_are_refused(body, reason):
    with pytest.raises(BadRequest) as raised:
        parse_event(http_v2(body))
    assert raised.value.status == 400 and reason in str(raised.value)


@pytest.mark.parametrize("fields, reason", [
    ({"requestContext": "x"}, "requestContext"),
    ({"requestContext": [1]}, "requestContext"),
    ({"requestContext": 3}, "requestContext"),
    ({"requestContext": None}, "requestContext"),
    ({"requestContext": {"http": "x"}}, "requestContext"),
    ({"requestContext": {"http": {"method": 5}}}, "method"),
    ({"httpMethod": 5}, "method"),
    ({"httpMethod": ["POST"]}, "method"),
    ({"headers": ["content-type"]}, "headers"),
    ({"headers": "content-type: application/json"}, "headers"),
    ({"headers": {"content-type": 5}}, "headers"),
    ({"headers": {"content-type": None}}, "headers"),
    ({"headers": {5: "application/json"}}, "headers"),
    ({"multiValueHeaders": "x"}, "multiValueHeaders"),
    ({"multiValueHeaders": {"content-type": "application/json"}}, "multiValueHeaders"),
    ({"multiValueHeaders": {"content-type": [5]}}, "multiValueHeaders"),
    ({"multiValueHeaders": {"content-type": {"a": 1}}}, "multiValueHeaders"),
    ({"multiValueHeaders": {5: ["x"]}}, "multiValueHeaders"),
    ({"queryStringParameters": ["top_k"]}, "queryStringParameters"),
    ({"queryStringParameters": "top_k=3"}, "queryStringParameters"),
    ({"queryStringParameters": {"top_k": 3}}, "queryStringParameters"),
    ({"multiValueQueryStringParameters": [1]}, "multiValueQueryStringParameters"),
    ({"multiValueQueryStringParameters": {"top_k": "3"}}, "multiValueQueryStringParameters"),
    ({"multiValueQueryStringParameters": {"top_k": [3]}}, "multiValueQueryStringParameters"),
    ({"body": 5}, "body"),
    ({"body": {"url": URL}}, "body"),
    ({"isBase64Encoded": "false"}, "isBase64Encoded"),
    ({"isBase64Encoded": 1}, "isBase64Encoded"),
    ({"isBase64Encoded": 0}, "isBase64Encoded"),
    ({"isBase64Encoded": True, "body": "!!!"}, "not valid base64"),
    ({"isBase64Encoded": True, "body": "\u00e9t\u00e9"}, "not valid base64"),
    ({"isBase64Encoded": True, "body": "\ud800"}, "not valid base64"),
    ({"headers": {"content-type": "image/jpeg"}, "body": "\ud800"}, "binaryMediaTypes"),
])
def test_malformed_proxy_events_are_refused_naming_the_field(fields, reason):
    with pytest.raises(BadRequest) as raised:
        parse_event(direct_proxy(**fields))
    assert raised.value.status == 400 and reason in str(raised.value)


@pytest.mark.parametrize("event, status, reason", [
    ({"image": b64(JPEG), "content_type": "image/" + "x" * 2000}, 400, "not a media type"),
    ({"url": "https://example.com/\ud800.jpg"}, 400, "\"url\""),
    ({"url": "http://example.com:99999/dog.jpg"}, 400, "\"url\""),
    ({"url": "http://[::1/dog.jpg"}, 400, "\"url\""),
])
def test_fields_the_runtime_api_would_reject_are_refused_first(event, status, reason):
    with pytest.raises(BadRequest) as raised:
        parse_event(event)
    assert raised.value.status == status and reason in str(raised.value)


@pytest.mark.parametrize("event", [
    pytest.param(http_v2(json.dumps({"url": URL}), method="X" * 100_000), id="method"),
    pytest.param(http_v2("hello", content_type="text/" + "p" * 100_000), id="content-type-header"),
    pytest.param({"image": b64(JPEG), "content_type": "j" * 100_000}, id="content_type-field"),
])
def test_a_refusal_quotes_at_most_a_short_part_of_what_was_sent(event):
    with pytest.raises(BadRequest) as raised:
        parse_event(event)
    assert len(str(raised.value)) < 300


def test_real_proxy_events_with_null_optional_fields_are_still_read():
    """API Gateway REST sends null for absent headers and query strings."""
    event = rest_v1(json.dumps({"url": URL}))
    event.update(headers=None, multiValueHeaders=None, queryStringParameters=None,
                 multiValueQueryStringParameters=None)
    assert json.loads(parse_event(event).body) == {"url": URL}
