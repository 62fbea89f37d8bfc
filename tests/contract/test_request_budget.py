"""The request budget, on the worker's own request path (toolkit, transformer, handlers, ONNX Runtime).

Every hostile request of kennel_ops.load.bombs gets its expected answer (a 4xx with a
reason, or 200 for the largest images the budget admits) and no request adds more
than 256 MiB to an idle worker. Measured by kennel-bench-budget (kennel_ops/bench/budget.py) in a process
of its own, so nothing else this test session allocated hides or adds memory;
docs/benchmarks.md has its figures on ResNet-50.

Then a property-based fuzz of the same path: generated bodies (images of every
format and mode, whole or damaged, raw or in JSON and JSON lines, any JSON),
content types, Accept and custom attributes; every answer is 200 or a 4xx JSON
reason, and the worker's memory stays within the budget.
"""
from __future__ import annotations

import base64
import io
import json
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from kennel_ops.bench.budget import BUDGET_MIB, Worker, reset_peak, _status_kib
from serve_support import resnet18_base  # noqa: F401 (fixture)


def test_hostile_requests_are_answered_within_the_memory_budget(resnet18_base, tmp_path):  # noqa: F811
    report = tmp_path / "budget.json"
    result = subprocess.run([sys.executable, "-m", "kennel_ops.bench.budget", "--model-dir",
                             str(resnet18_base / "model"), "--json", str(report)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(report.read_text())
    assert len(rows) >= 20
    for row in rows:
        assert row["status"] == row["expected"], row
        assert row["peak_mib"] <= BUDGET_MIB, row
        if row["status"] != 200:
            assert 400 <= row["status"] < 500 and len(row["reason"]) > 10, row
    # The budget is not vacuous: the largest admitted images do cost what a 40-megapixel decode costs.
    assert max(row["peak_mib"] for row in rows) > 100


# ---------------------------------------------------------------- the fuzz

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "ICO", "PPM", "TGA", "PCX", "BLP", "DDS", "SGI")
MODES = ("1", "L", "P", "RGB", "RGBA", "CMYK", "LA", "I;16", "I", "F", "YCbCr")
CONTENT_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif", "image/tiff", "image/x-icon",
                 "application/x-image", "application/octet-stream", "application/json",
                 "application/json; charset=utf-8", "application/json; charset=latin-1", "application/jsonlines",
                 "text/plain", "", "image/")
ACCEPTS = ("application/json", "application/vnd.kennel.topk+json", "application/jsonlines", "*/*", "text/csv",
           "application/json;q=0", "")


@st.composite
def image_bytes(draw) -> bytes:
    """An image of any format and mode Pillow can write, whole, truncated or with bytes changed."""
    size = (draw(st.integers(1, 48)), draw(st.integers(1, 48)))
    mode = draw(st.sampled_from(MODES))
    fmt = draw(st.sampled_from(FORMATS))
    try:
        image = Image.new(mode, size, draw(st.integers(0, 255)))
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        data = buffer.getvalue()
    except Exception:  # noqa: BLE001 - Pillow cannot write every mode in every format: use random bytes
        data = draw(st.binary(min_size=1, max_size=256))
    damage = draw(st.sampled_from(("none", "none", "truncate", "flip")))
    if damage == "truncate" and len(data) > 1:
        data = data[: draw(st.integers(1, len(data) - 1))]
    elif damage == "flip":
        changed = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            changed[draw(st.integers(0, len(changed) - 1))] = draw(st.integers(0, 255))
        data = bytes(changed)
    return data


def base64_text(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)


@st.composite
def records(draw) -> object:
    """One JSON record: mostly the documented fields, with values right or wrong."""
    field = draw(st.sampled_from(("image", "images", "url", "other")))
    if field == "image":
        return {"image": draw(image_bytes().map(base64_text) | JSON_VALUES)}
    if field == "images":
        return {"images": draw(st.lists(image_bytes().map(base64_text) | st.text(max_size=8), max_size=4)
                               | JSON_VALUES)}
    if field == "url":
        return {"url": draw(st.sampled_from(("https://example.com/dog.jpg", "http://127.0.0.1/", "file:///etc/x"))
                            | JSON_VALUES)}
    return draw(JSON_VALUES)


RAW_TYPES = ("image/jpeg", "image/png", "application/x-image", "application/octet-stream")


@st.composite
def requests(draw) -> tuple[bytes, str]:
    """(body, Content-Type): mostly a body of the type it claims, sometimes anything under any type."""
    kind = draw(st.sampled_from(("image", "image", "json", "jsonlines", "anything")))
    if kind == "image":
        return draw(image_bytes()), draw(st.sampled_from(RAW_TYPES))
    if kind == "json":
        return json.dumps(draw(records())).encode(), "application/json"
    if kind == "jsonlines":
        lines = [json.dumps(draw(records())) for _ in range(draw(st.integers(1, 3)))]
        return "\n".join(lines).encode(), "application/jsonlines"
    return draw(st.binary(max_size=512) | image_bytes()), draw(st.sampled_from(CONTENT_TYPES))


@pytest.fixture(scope="module")
def worker(resnet18_base):  # noqa: F811
    # URL fetching is off: a generated URL must not reach anything (the answer is a 400 saying so).
    return Worker(resnet18_base / "model")


def test_any_request_is_answered_200_or_4xx_within_the_memory_budget(worker):
    idle_kib = reset_peak()

    @settings(max_examples=250, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(request=requests(), accept=st.sampled_from(ACCEPTS),
           # Digits of other scripts too: str.isdigit() takes '²', '①' and '٣', int() only the last.
           top_k=st.none() | st.text(max_size=6) | st.integers(-3, 200).map(str)
           | st.text(st.sampled_from("²³①٣7"), min_size=1, max_size=3) | st.just("9" * 5000))
    def answered(request, accept, top_k):
        body, content_type = request
        headers = {"Accept": accept} if accept else {}
        if top_k is not None:
            headers["X-Amzn-SageMaker-Custom-Attributes"] = f"top_k={top_k}"
        status, answer = worker.invoke(body, content_type, headers)
        assert status == 200 or 400 <= status < 500, (status, answer)
        if status != 200:
            assert "Traceback" not in answer
            assert isinstance(json.loads(answer).get("error"), str), answer

    answered()
    assert (_status_kib("VmHWM") - idle_kib) / 1024 <= BUDGET_MIB
