"""Predictions -> the response body the client's Accept asks for.

- application/json (also */*, or no Accept): what the original endpoint returned,
  one list of raw logits per image in class (sorted folder) order:
  [[s_0, ..., s_132]] for one image, [[...], [...]] for two.
- application/vnd.kennel.topk+json: per image the k most likely breeds, best first:
  [[{"breed": "Akita", "class_name": "004.Akita", "index": 3, "probability": 0.91}, ...]]
  k is KENNEL_TOP_K (5) unless the custom attributes say otherwise.
- application/jsonlines: one line per image, each line the application/json answer
  that image would get alone (batch transform, AssembleWith=Line).

The header X-Amzn-SageMaker-Custom-Attributes: top_k=N switches application/json
(and jsonlines) to the top-k form with N entries, for clients that cannot set Accept.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

import kennel_artifact

from kennel_serve.inputs import parse_media_type
from kennel_serve.mms_toolkit.errors import bad_request, not_acceptable

JSON_ANSWER_TYPE = "application/json"
TOPK_ANSWER_TYPE = "application/vnd.kennel.topk+json"
JSONLINES_ANSWER_TYPE = "application/jsonlines"
_ACCEPT_ALIASES = {"application/jsonl": JSONLINES_ANSWER_TYPE, "application/x-jsonlines": JSONLINES_ANSWER_TYPE}
ANSWER_TYPES = (JSON_ANSWER_TYPE, TOPK_ANSWER_TYPE, JSONLINES_ANSWER_TYPE)
CUSTOM_ATTRIBUTES_HEADER = "x-amzn-sagemaker-custom-attributes"
_TOP_K_DIGITS = re.compile(r"[0-9]{1,6}")


@dataclass
class Prediction:
    """What predict_fn returns: logits [N, num_classes] and the names of the classes."""

    logits: np.ndarray
    class_names: list[str]


def negotiate(accept: str | None, default: str = JSON_ANSWER_TYPE) -> str:
    """The supported media type the Accept header prefers (q-values honoured), else 406."""
    if not accept or not accept.strip():
        return default if default in ANSWER_TYPES else JSON_ANSWER_TYPE
    offers = []
    for position, part in enumerate(accept.split(",")):
        media_type, params = parse_media_type(part)
        try:
            quality = float(params.get("q", "1"))
        except ValueError:
            quality = 1.0
        if media_type and quality > 0:
            offers.append((-quality, position, _ACCEPT_ALIASES.get(media_type, media_type)))
    for _, _, media_type in sorted(offers):
        if media_type in ANSWER_TYPES:
            return media_type
        if media_type in ("*/*", "application/*"):
            return default if default in ANSWER_TYPES else JSON_ANSWER_TYPE
    raise not_acceptable(f"Accept {accept.strip()!r} asks for nothing this endpoint answers with; "
                         f"accept one of: {', '.join(ANSWER_TYPES)}")


def custom_attributes(headers: Mapping[str, Any] | None) -> dict[str, str]:
    """X-Amzn-SageMaker-Custom-Attributes 'top_k=5; other=x' -> {'top_k': '5', 'other': 'x'}."""
    raw = ""
    for name, value in (headers or {}).items():
        if str(name).lower() == CUSTOM_ATTRIBUTES_HEADER:
            raw = value.decode("latin-1") if isinstance(value, (bytes, bytearray)) else str(value)
    attributes = {}
    for item in raw.replace(";", ",").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            attributes[key.strip().lower()] = value.strip()
    return attributes


def requested_top_k(attributes: Mapping[str, str]) -> int | None:
    raw = attributes.get("top_k")
    if raw is None:
        return None
    # ASCII digits only (str.isdigit() also takes '²', which int() refuses), and few of them.
    if not _TOP_K_DIGITS.fullmatch(raw) or int(raw) < 1:
        shown = raw if len(raw) <= 20 else raw[:20] + "..."
        raise bad_request(f"custom attribute top_k={shown!r} must be a whole number from 1 to 999999")
    return int(raw)


def render(prediction: Prediction, media_type: str, attributes: Mapping[str, str], default_k: int) -> tuple[str, str]:
    """(body, Content-Type) for a negotiated media type."""
    k = requested_top_k(attributes)
    if media_type == TOPK_ANSWER_TYPE and k is None:
        k = default_k
    logits = np.asarray(prediction.logits)
    if k is None:
        rows: list[Any] = logits.tolist()
    else:
        rows = [kennel_artifact.top_k(row, prediction.class_names, k) for row in logits]
    if media_type == JSONLINES_ANSWER_TYPE:
        return "".join(json.dumps([row]) + "\n" for row in rows), JSONLINES_ANSWER_TYPE
    return json.dumps(rows), media_type
