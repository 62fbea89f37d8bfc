"""Lambda events -> the one request the endpoint understands.

Accepted events (anything else is a 400 with the reason):

- direct invocation, as the original function took it: ``{"url": "https://..."}``
- direct invocation with the image itself:
  ``{"image": "<base64>", "content_type": "image/jpeg"}`` (content_type may be
  left out for JPEG, PNG, GIF, WebP and BMP: it is read from the bytes;
  a ``data:image/png;base64,...`` URI also works)
- API Gateway REST (payload 1.0), HTTP API (1.0 and 2.0), Function URL and ALB
  proxy events: a POST whose body is either one of the JSON objects above
  (Content-Type application/json) or the raw image (Content-Type image/...),
  base64-encoded when ``isBase64Encoded`` is true.

``top_k`` (a field of the JSON object, or the query string of a proxy event)
asks for the k most likely breeds instead of the raw class scores. ``model``
(the same two places) names the model of a multi-model endpoint to ask, such
as ``rex.tar.gz`` (InvokeEndpoint's TargetModel; see TARGET_MODEL).

Whatever the caller controls is checked here, down to the shape of each proxy
field, so that a malformed event is a BadRequest naming what is wrong and never
some other exception (answered 500, with a traceback in the log).
"""
from __future__ import annotations

import base64
import binascii
import json
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any, Mapping

# InvokeEndpoint's own limit on the request body (the BodyBlob shape: 6 MB).
MAX_BODY_BYTES = 6_291_456
MAX_TOP_K = 1000
MAX_URL_CHARS = 2048
# How much of a refused value a reason quotes: enough to recognise it.
QUOTED_CHARS = 40
JSON = "application/json"
# Content types the serving container reads as image bytes.
_BINARY_TYPES = ("application/x-image", "application/octet-stream")
# RFC 6838 names: at most 127 characters each side, which also keeps the header
# inside what InvokeEndpoint accepts (1024 characters).
_MEDIA_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}")
# ASCII digits only: str.isdigit() also takes "²" and "٣", which int() refuses or reads.
_TOP_K_TEXT = re.compile(r"[0-9]{1,9}")
# A model of a multi-model endpoint (InvokeEndpoint's TargetModel, the object's key under the
# endpoint's S3 prefix) as `kennel-aws add-model` names it: NAME.tar.gz, NAME 1-100 letters,
# digits, '.', '_' and '-' that start and end with a letter or digit. Well inside what SageMaker
# takes (1024 printable characters); with no '/', no name reaches outside the prefix. The
# operator tools read this rule from here, the one definition.
TARGET_MODEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,98}[A-Za-z0-9])?\.tar\.gz")
TARGET_MODEL_SUFFIX = ".tar.gz"
TARGET_MODEL_RULE = ("NAME.tar.gz, NAME 1-100 letters, digits, '.', '_' and '-' starting and ending with a "
                     "letter or digit")
_DATA_URI = re.compile(r"^data:([^;,]+);base64,", re.IGNORECASE)
_SIGNATURES = ((b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG\r\n\x1a\n", "image/png"),
               (b"GIF87a", "image/gif"), (b"GIF89a", "image/gif"), (b"BM", "image/bmp"))


class BadRequest(ValueError):
    """The event cannot become an endpoint request; status is the HTTP answer (400, 405, 413, 415)."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class EndpointRequest:
    """What InvokeEndpoint gets: body and its Content-Type, the top_k asked for (None: raw scores),
    and the target model the caller named (None: the function's default, if any)."""

    body: bytes
    content_type: str
    top_k: int | None
    source: str  # "url", "image" or "raw-image": for the log line, never the payload itself
    target_model: str | None = None


def parse_event(event: Any) -> EndpointRequest:
    """Any supported event -> EndpointRequest, or BadRequest with a reason the caller can act on."""
    if not isinstance(event, dict):
        raise BadRequest("the event must be a JSON object such as {\"url\": \"https://...\"}")
    if _is_proxy_event(event):
        request = _parse_proxy_event(event)
    else:
        request = _parse_fields(event, top_k=None)
    if len(request.body) > MAX_BODY_BYTES:
        raise BadRequest(f"the image is {len(request.body)} bytes; the endpoint accepts at most "
                         f"{MAX_BODY_BYTES} bytes (6 MB)", status=413)
    return request


def _is_proxy_event(event: dict) -> bool:
    """API Gateway (REST and HTTP API), Function URL and ALB events all carry these."""
    return "requestContext" in event or "httpMethod" in event


def _parse_proxy_event(event: dict) -> EndpointRequest:
    method = _proxy_method(event)
    if method and method.upper() != "POST":
        raise BadRequest(f"method {_quoted(method)} is not supported: POST the image or a JSON object", status=405)
    headers = _lower_keys(_string_map(event, "headers"), _list_map(event, "multiValueHeaders"))
    query = _first_values(_string_map(event, "queryStringParameters"),
                          _list_map(event, "multiValueQueryStringParameters"))
    top_k = parse_top_k(query["top_k"]) if "top_k" in query else None
    target_model = parse_target_model(query["model"]) if "model" in query else None

    body = event.get("body")
    if body is None or body == "":
        raise BadRequest("the request has no body: POST a JPEG/PNG image or {\"url\": \"https://...\"}")
    if not isinstance(body, str):
        raise BadRequest("the proxy event's body must be a string")
    encoded = event.get("isBase64Encoded", False)
    if encoded is None:
        encoded = False
    if not isinstance(encoded, bool):
        raise BadRequest("the event's isBase64Encoded must be true or false")
    media_type = _media_type(headers.get("content-type", ""))

    if media_type == JSON or media_type.endswith("+json") or (not media_type and not encoded):
        # A text body that names no Content-Type is read as the JSON object.
        return _parse_fields(_load_json(_b64decode(body, "the request body") if encoded else body), top_k,
                             target_model)
    if media_type.startswith("image/") or media_type in _BINARY_TYPES or not media_type:
        if not encoded:
            raise BadRequest("the image arrived as text, which corrupts it: send it base64-encoded "
                             "(API Gateway REST APIs need image/* in their binaryMediaTypes)")
        data = _b64decode(body, "the request body")
        content_type = _image_content_type(data, media_type if media_type.startswith("image/") else "")
        return EndpointRequest(data, content_type, top_k, "raw-image", target_model)
    raise BadRequest(f"Content-Type {_quoted(media_type)} is not supported: send application/json or an "
                     "image type (image/jpeg, image/png)", status=415)


def _proxy_method(event: dict) -> str:
    """The HTTP method: httpMethod (REST API, ALB) or requestContext.http.method (HTTP API 2.0,
    Function URLs); "" when the event names none."""
    context = event.get("requestContext", {})
    if not isinstance(context, dict):
        raise BadRequest("the event's requestContext must be an object")
    http = context.get("http")
    if http is not None and not isinstance(http, dict):
        raise BadRequest("the event's requestContext.http must be an object")
    method = event.get("httpMethod") or (http or {}).get("method") or ""
    if not isinstance(method, str):
        raise BadRequest("the event's HTTP method must be a string such as \"POST\"")
    return method


def _load_json(data: str | bytes) -> Any:
    try:
        return json.loads(data, parse_int=_json_int)
    except BadRequest:
        raise
    except RecursionError:
        raise BadRequest("the body is nested too deeply: send a flat JSON object such as "
                         "{\"url\": \"https://...\"}") from None
    except ValueError:  # UnicodeDecodeError included
        raise BadRequest("the body is not valid JSON") from None


def _json_int(digits: str) -> int:
    try:
        return int(digits)
    except ValueError:  # over the interpreter's limit on digits (4300 by default)
        raise BadRequest("the body holds a number too long to read") from None


def _parse_fields(fields: Any, top_k: int | None, target_model: str | None = None) -> EndpointRequest:
    """{"url"} or {"image", "content_type"}, each with an optional "top_k" and "model"."""
    if not isinstance(fields, dict):
        raise BadRequest("the JSON body must be an object such as {\"url\": \"https://...\"}")
    if "top_k" in fields:
        top_k = parse_top_k(fields["top_k"])
    if "model" in fields:
        target_model = parse_target_model(fields["model"])
    has_url, has_image = "url" in fields, "image" in fields
    if has_url == has_image:
        raise BadRequest("give exactly one of \"url\" (an http(s) address of the image) "
                         "or \"image\" (the image bytes, base64-encoded)")
    if has_url:
        url = _check_url(fields["url"])
        return EndpointRequest(json.dumps({"url": url}).encode("utf-8"), JSON, top_k, "url", target_model)
    image = fields["image"]
    if not isinstance(image, str) or not image:
        raise BadRequest("\"image\" must be a non-empty base64 string")
    declared = fields.get("content_type")
    if declared is not None and not isinstance(declared, str):
        raise BadRequest("\"content_type\" must be a string such as \"image/jpeg\"")
    data_uri = _DATA_URI.match(image)
    if data_uri:
        declared = declared or data_uri.group(1)
        image = image[data_uri.end():]
    data = _b64decode(image, "\"image\"")
    return EndpointRequest(data, _image_content_type(data, _media_type(declared or "")), top_k, "image",
                           target_model)


def parse_top_k(value: Any) -> int:
    """A positive whole number from JSON (5, "5") or a query string ("5")."""
    if isinstance(value, str) and _TOP_K_TEXT.fullmatch(value.strip()):
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TOP_K:
        raise BadRequest(f"top_k must be a whole number from 1 to {MAX_TOP_K}")
    return value


def parse_target_model(value: Any) -> str:
    """A model of a multi-model endpoint, such as "rex.tar.gz" (TARGET_MODEL)."""
    if not isinstance(value, str) or not TARGET_MODEL.fullmatch(value):
        raise BadRequest(f"model must name one of the endpoint's models: {TARGET_MODEL_RULE}")
    return value


def _check_url(url: Any) -> str:
    if not isinstance(url, str) or not url.strip():
        raise BadRequest("\"url\" must be a non-empty string")
    url = url.strip()
    if len(url) > MAX_URL_CHARS:
        raise BadRequest(f"\"url\" is longer than {MAX_URL_CHARS} characters")
    try:
        url.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, from a JSON escape such as "\ud800"
        raise BadRequest("\"url\" is not valid UTF-8 text") from None
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
        parts.port  # raises for a port that is not a number from 0 to 65535
    except ValueError:
        host, parts = None, None
    if parts is None or parts.scheme not in ("http", "https") or not host:
        raise BadRequest("\"url\" must be an http:// or https:// address of an image")
    return url


def _b64decode(text: str, what: str) -> bytes:
    compact = "".join(text.split())  # base64 wrapped at 76 columns is still base64
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{what} is not valid base64") from None
    if not data:
        raise BadRequest(f"{what} is empty")
    return data


def _image_content_type(data: bytes, declared: str) -> str:
    """The declared image type, else the one the bytes start with; BadRequest when neither is known."""
    if declared:
        if not _MEDIA_TYPE.fullmatch(declared):
            raise BadRequest(f"content_type {_quoted(declared)} is not a media type such as image/jpeg")
        return declared
    for signature, media_type in _SIGNATURES:
        if data.startswith(signature):
            return media_type
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    raise BadRequest("the image is not JPEG, PNG, GIF, WebP or BMP: give its content_type", status=415)


def _media_type(content_type: str) -> str:
    """'Image/JPEG; charset=binary' -> 'image/jpeg'."""
    return content_type.split(";", 1)[0].strip().lower()


def _quoted(text: str) -> str:
    """A value the caller sent, for a reason: quoted, and cut short when long."""
    return repr(text if len(text) <= QUOTED_CHARS else text[:QUOTED_CHARS] + "...")


def _string_map(event: dict, field: str) -> Mapping[str, str]:
    """A proxy event's {name: value} field (headers, queryStringParameters); null when the request had none."""
    value = event.get(field)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(key, str) and isinstance(item, str)
                                              for key, item in value.items()):
        raise BadRequest(f"the event's {field} must be an object of strings")
    return value


def _list_map(event: dict, field: str) -> Mapping[str, list[str]]:
    """A proxy event's {name: [value, ...]} field (multiValueHeaders, multiValueQueryStringParameters)."""
    value = event.get(field)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
            isinstance(key, str) and isinstance(items, list) and all(isinstance(item, str) for item in items)
            for key, items in value.items()):
        raise BadRequest(f"the event's {field} must be an object of lists of strings")
    return value


def _lower_keys(headers: Mapping[str, str], multi: Mapping[str, list[str]]) -> dict[str, str]:
    merged = {key.lower(): values[0] for key, values in multi.items() if values}
    merged.update({key.lower(): value for key, value in headers.items()})
    return merged


def _first_values(single: Mapping[str, str], multi: Mapping[str, list[str]]) -> dict[str, str]:
    merged = {key: values[0] for key, values in multi.items() if values}
    merged.update(single)
    return merged
