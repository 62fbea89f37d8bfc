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
asks for the k most likely breeds instead of the raw class scores.
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
JSON = "application/json"
# Content types the serving container reads as image bytes.
_BINARY_TYPES = ("application/x-image", "application/octet-stream")
_MEDIA_TYPE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*$")
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
    """What InvokeEndpoint gets: body and its Content-Type, and the top_k asked for (None: raw scores)."""

    body: bytes
    content_type: str
    top_k: int | None
    source: str  # "url", "image" or "raw-image": for the log line, never the payload itself


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
    method = event.get("httpMethod") or ((event.get("requestContext") or {}).get("http") or {}).get("method")
    if method and method.upper() != "POST":
        raise BadRequest(f"method {method} is not supported: POST the image or a JSON object", status=405)
    headers = _lower_keys(event.get("headers"), event.get("multiValueHeaders"))
    query = _first_values(event.get("queryStringParameters"), event.get("multiValueQueryStringParameters"))
    top_k = parse_top_k(query["top_k"]) if "top_k" in query else None

    body = event.get("body")
    if body is None or body == "":
        raise BadRequest("the request has no body: POST a JPEG/PNG image or {\"url\": \"https://...\"}")
    if not isinstance(body, str):
        raise BadRequest("the proxy event's body must be a string")
    encoded = bool(event.get("isBase64Encoded"))
    data = _b64decode(body, "the request body") if encoded else body.encode("utf-8")
    media_type = _media_type(headers.get("content-type", ""))

    if media_type == JSON or media_type.endswith("+json") or (not media_type and not encoded):
        # A text body that names no Content-Type is read as the JSON object.
        return _parse_fields(_load_json(data), top_k)
    if media_type.startswith("image/") or media_type in _BINARY_TYPES or not media_type:
        if not encoded:
            raise BadRequest("the image arrived as text, which corrupts it: send it base64-encoded "
                             "(API Gateway REST APIs need image/* in their binaryMediaTypes)")
        content_type = _image_content_type(data, media_type if media_type.startswith("image/") else "")
        return EndpointRequest(data, content_type, top_k, "raw-image")
    raise BadRequest(f"Content-Type {media_type} is not supported: send application/json or an "
                     "image type (image/jpeg, image/png)", status=415)


def _load_json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("the body is not valid JSON") from None


def _parse_fields(fields: Any, top_k: int | None) -> EndpointRequest:
    """{"url"} or {"image", "content_type"}, each with an optional "top_k"."""
    if not isinstance(fields, dict):
        raise BadRequest("the JSON body must be an object such as {\"url\": \"https://...\"}")
    if "top_k" in fields:
        top_k = parse_top_k(fields["top_k"])
    has_url, has_image = "url" in fields, "image" in fields
    if has_url == has_image:
        raise BadRequest("give exactly one of \"url\" (an http(s) address of the image) "
                         "or \"image\" (the image bytes, base64-encoded)")
    if has_url:
        url = _check_url(fields["url"])
        return EndpointRequest(json.dumps({"url": url}).encode("utf-8"), JSON, top_k, "url")
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
    return EndpointRequest(data, _image_content_type(data, _media_type(declared or "")), top_k, "image")


def parse_top_k(value: Any) -> int:
    """A positive whole number from JSON (5, "5") or a query string ("5")."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TOP_K:
        raise BadRequest(f"top_k must be a whole number from 1 to {MAX_TOP_K}")
    return value


def _check_url(url: Any) -> str:
    if not isinstance(url, str) or not url.strip():
        raise BadRequest("\"url\" must be a non-empty string")
    url = url.strip()
    if len(url) > MAX_URL_CHARS:
        raise BadRequest(f"\"url\" is longer than {MAX_URL_CHARS} characters")
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
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
        if not _MEDIA_TYPE.match(declared):
            raise BadRequest(f"content_type {declared!r} is not a media type such as image/jpeg")
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


def _lower_keys(headers: Mapping[str, Any] | None, multi: Mapping[str, Any] | None) -> dict[str, str]:
    merged = {key.lower(): values[0] for key, values in (multi or {}).items() if values}
    merged.update({key.lower(): value for key, value in (headers or {}).items() if isinstance(value, str)})
    return merged


def _first_values(single: Mapping[str, Any] | None, multi: Mapping[str, Any] | None) -> dict[str, str]:
    merged = {key: values[0] for key, values in (multi or {}).items() if values}
    merged.update({key: value for key, value in (single or {}).items() if isinstance(value, str)})
    return merged
