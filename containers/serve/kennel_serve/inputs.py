"""Request bodies -> decoded RGB images.

Accepted Content-Types (parameters such as charset are allowed):

- image/jpeg, image/png, any other image/* Pillow decodes, application/x-image,
  application/octet-stream: the body is one image; its format is sniffed from the
  bytes, never trusted from the header.
- application/json, one object:
    {"url": "https://..."}            the original clients: the image is fetched
    {"image": "<base64>"}             one image
    {"images": ["<base64>", ...]}     several images, answered in one forward pass
  base64 may be standard or URL-safe, with or without a data: URI prefix.
- application/jsonlines (batch transform, SplitType=Line): one such object per line.
"""
from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Callable

from kennel_artifact import ImageError, Preprocessing, decode_image

from kennel_serve import metrics
from kennel_serve.mms_toolkit.errors import bad_request, payload_too_large, unsupported_media_type

JSON_CONTENT_TYPE = "application/json"
JSONLINES_CONTENT_TYPES = ("application/jsonlines", "application/jsonl", "application/x-jsonlines")
RAW_IMAGE_CONTENT_TYPES = ("application/x-image", "application/octet-stream")
SUPPORTED_CONTENT_TYPES_TEXT = ("image/jpeg, image/png (any image/*), application/x-image, "
                                "application/octet-stream, application/json, application/jsonlines")
RECORD_FIELDS = ("url", "image", "images")


def parse_media_type(header: str | None) -> tuple[str, dict[str, str]]:
    """'Application/JSON; charset=UTF-8' -> ('application/json', {'charset': 'utf-8'})."""
    if not header:
        return "", {}
    media_type, *params = header.split(";")
    parsed = {}
    for param in params:
        name, _, value = param.partition("=")
        if name.strip():
            parsed[name.strip().lower()] = value.strip().strip('"').lower()
    return media_type.strip().lower(), parsed


def is_raw_image(media_type: str) -> bool:
    return media_type.startswith("image/") or media_type in RAW_IMAGE_CONTENT_TYPES


def decode_request(body: bytes | bytearray | str | None, content_type: str | None, *,
                   fetch_url: Callable[[str], bytes], max_images: int, max_pixels: int,
                   max_request_pixels: int,
                   preprocessing: Preprocessing | None = None) -> list[Any]:
    """The request's images, in order, or RequestError (4xx) saying what is wrong.

    With ``preprocessing`` each image is turned into the model's input (float32
    [3, H, W]) as soon as it is decoded and then dropped, so a request holds at most
    one decoded image at a time; without it the decoded RGB images are returned.
    Images are fetched and decoded one after the other, and the pixels of all of
    them together may not exceed ``max_request_pixels``.
    """
    media_type, _ = parse_media_type(content_type)
    if not media_type:
        raise unsupported_media_type(f"the request has no Content-Type; send one of: {SUPPORTED_CONTENT_TYPES_TEXT}")
    if not (is_raw_image(media_type) or media_type == JSON_CONTENT_TYPE or media_type in JSONLINES_CONTENT_TYPES):
        raise unsupported_media_type(f"Content-Type {media_type!r} is not supported; "
                                     f"send one of: {SUPPORTED_CONTENT_TYPES_TEXT}")
    if body is None or len(body) == 0:
        raise bad_request("the request body is empty")
    if is_raw_image(media_type):
        raw = body.encode("utf-8") if isinstance(body, str) else bytes(body)
        blobs: list[tuple[str, Callable[[], bytes]]] = [("the image", lambda: raw)]
    elif media_type == JSON_CONTENT_TYPE:
        blobs = _record_sources(_parse_json(body, "the JSON body"), "the JSON body", fetch_url)
    else:
        blobs = []
        for number, line in enumerate(_text(body).splitlines(), start=1):
            if line.strip():
                where = f"line {number}"
                blobs.extend(_record_sources(_parse_json(line, where), where, fetch_url))
        if not blobs:
            raise bad_request("the JSON lines body holds no record")
    if len(blobs) > max_images:
        raise bad_request(f"{len(blobs)} images in one request, more than the limit of {max_images} "
                          f"(KENNEL_MAX_IMAGES)")
    pixels_left = max_request_pixels

    def within_budget(width: int, height: int) -> None:
        nonlocal pixels_left
        if preprocessing is not None:
            preprocessing.check_size(width, height)
        if width * height > pixels_left:
            raise payload_too_large(f"the request's images hold more than {max_request_pixels} pixels in all "
                                    f"(KENNEL_MAX_REQUEST_PIXELS); send fewer or smaller images")
        pixels_left -= width * height

    several = len(blobs) > 1 or blobs[0][0] != "the image"
    decoded = []
    while blobs:
        where, source = blobs.pop(0)  # from here only `source` keeps this image's bytes alive
        try:
            image = decode_image(source(), max_pixels=max_pixels, check_size=within_budget)
            if preprocessing is not None:
                with metrics.stage("preprocess"):
                    image = preprocessing.apply(image)
            decoded.append(image)
        except ImageError as exc:
            raise bad_request(f"{where}: {exc}" if several else str(exc)) from None
        del image, source  # before the next image is fetched and decoded
    return decoded


def _text(body: bytes | bytearray | str) -> str:
    if isinstance(body, str):
        return body
    try:
        return bytes(body).decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request("the body is not valid UTF-8 text") from None


def _parse_json(text: bytes | bytearray | str, where: str) -> Any:
    try:
        return json.loads(_text(text))
    except json.JSONDecodeError as exc:
        raise bad_request(f"{where} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise bad_request(f"{where} is nested too deeply") from None
    except ValueError:
        # json turns a number too long for int() (over 4300 digits) into a ValueError of its own.
        raise bad_request(f"{where} holds a number too long to read") from None


def _record_sources(record: Any, where: str, fetch_url: Callable[[str], bytes]) -> list[tuple[str, Callable[[], bytes]]]:
    """(description, loader) per image of one JSON record; loaders run after the count check."""
    if not isinstance(record, dict):
        raise bad_request(f"{where} must be a JSON object with one of the fields {', '.join(RECORD_FIELDS)}")
    present = [name for name in RECORD_FIELDS if name in record]
    if not present:
        raise bad_request(f"{where} needs one of the fields {', '.join(RECORD_FIELDS)}; it has "
                          f"{', '.join(sorted(map(str, record))) or 'none'}")
    if len(present) > 1:
        raise bad_request(f"{where} must hold only one of the fields {', '.join(RECORD_FIELDS)}, not {' and '.join(present)}")
    name = present[0]
    value = record[name]
    if name == "url":
        if not isinstance(value, str) or not value.strip():
            raise bad_request(f"{where}: the field 'url' must be a non-empty string")
        return [(f"{where}: the image at the URL", lambda: fetch_url(value))]
    if name == "image":
        return [(f"{where}: image", _base64_loader(value, f"{where}: the field 'image'"))]
    if not isinstance(value, list) or not value:
        raise bad_request(f"{where}: the field 'images' must be a non-empty list of base64 strings")
    return [(f"{where}: images[{i}]", _base64_loader(item, f"{where}: images[{i}]")) for i, item in enumerate(value)]


def _base64_loader(value: Any, where: str) -> Callable[[], bytes]:
    data = _decode_base64(value, where)  # decoded now: a bad string is reported before any URL is fetched
    return lambda: data


def _decode_base64(value: Any, where: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise bad_request(f"{where} must be a non-empty base64 string")
    if value.startswith("data:"):
        header, comma, value = value.partition(",")
        if not comma or not header.endswith(";base64"):
            raise bad_request(f"{where} is a data: URI without base64 content")
    text = "".join(value.split()).translate(str.maketrans("-_", "+/"))  # URL-safe alphabet too
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{where} is not valid base64") from None
