"""The serving contract over real HTTP: the real launcher, real MMS (JVM) and real Python workers.

One server for the module (ResNet-18, random weights, 5 classes) on a free 127.0.0.1
port; a local HTTP server plays the image host for {"url": ...} requests (allowed
for this server only through KENNEL_URL_ALLOWLIST=127.0.0.1).
"""
import http.server as http_server
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from kennel_artifact import decode_image
from kennel_serve.engine import KennelModel
from serve_support import ServeProcess, b64, http, jpeg_bytes, plugins, resnet18_base  # noqa: F401

PHOTO = jpeg_bytes((500, 375), seed=1)
PNG_RGBA = jpeg_bytes((320, 240), seed=2, mode="RGBA", fmt="PNG")
GREY = jpeg_bytes((300, 300), seed=3, mode="L")
PALETTE = jpeg_bytes((260, 300), seed=4, mode="P", fmt="PNG")
URL_CAP = 2_000_000


def _bomb() -> bytes:
    import io
    from PIL import Image
    buffer = io.BytesIO()
    Image.new("1", (8000, 6000)).save(buffer, "PNG")  # a few kB, 48 Mpx decoded
    return buffer.getvalue()


BOMB = _bomb()


class ImageHost(http_server.BaseHTTPRequestHandler):
    """The image host: /dog.jpg, /big, /big-chunked, /slow, /missing, /redirect?to=..., /loop/<n>."""

    def do_GET(self):  # noqa: N802
        path, _, query = self.path.partition("?")
        if path == "/dog.jpg":
            self._send(200, PHOTO, "image/jpeg")
        elif path == "/big":
            self._send(200, b"\0" * (URL_CAP + 1), "image/jpeg")
        elif path == "/big-chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"\0" * 65536
            for _ in range(URL_CAP // len(chunk) + 2):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(1000):  # a byte every 10 ms: each read is quick, the whole is too slow
                self.wfile.write(b"\0")
                self.wfile.flush()
                time.sleep(0.01)
        elif path == "/redirect":
            self.send_response(302)
            self.send_header("Location", query.split("=", 1)[1])
            self.end_headers()
        elif path.startswith("/loop/"):
            self.send_response(301)
            self.send_header("Location", f"/loop/{int(path.rsplit('/', 1)[1]) + 1}")
            self.end_headers()
        else:
            self._send(404, b"no such image", "text/plain")

    def _send(self, status, body, content_type):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the fetcher stopped reading at its byte cap

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_host():
    server = http_server.ThreadingHTTPServer(("127.0.0.1", 0), ImageHost)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def server(resnet18_base, plugins):
    process = ServeProcess(resnet18_base, plugins, env={
        "KENNEL_URL_ALLOWLIST": "127.0.0.1", "KENNEL_URL_TIMEOUT_S": "3", "KENNEL_URL_MAX_BYTES": str(URL_CAP),
        "KENNEL_URL_MAX_REDIRECTS": "2", "SAGEMAKER_MAX_PAYLOAD_IN_MB": "1", "KENNEL_MAX_IMAGES": "8"})
    process.start()
    try:
        yield process.wait_ready()
    finally:
        process.stop()


@pytest.fixture(scope="module")
def local_model(resnet18_base):
    return KennelModel.load(Path(resnet18_base) / "model")


def expected_logits(model, *bodies):
    return model.predict([decode_image(body) for body in bodies])


def assert_json_error(reply, status, fragment):
    assert reply.status == status, reply.body[:300]
    assert reply.headers["content-type"].startswith("application/json")
    text = reply.body.decode()
    assert "Traceback" not in text and 'File "' not in text
    assert fragment in reply.json()["error"], reply.json()


def test_ping_execution_parameters_and_no_management_api(server):
    reply = http(f"{server.url}/ping")
    assert (reply.status, reply.json()) == (200, {"status": "Healthy"})
    assert http(f"{server.url}/execution-parameters").json() == {
        "MaxConcurrentTransforms": 1, "BatchStrategy": "MULTI_RECORD", "MaxPayloadInMB": 1}
    # MMS would otherwise list, register and delete models on the client port.
    assert http(f"{server.url}/models").status == 404
    assert http(f"{server.url}/models/model", method="DELETE").status in (404, 405)
    assert http(f"{server.url}/ping").status == 200


@pytest.mark.parametrize("path", ["/ping", "/execution-parameters"])
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_plugin_endpoints_with_another_method_are_405_with_a_reason(server, path, method):
    reply = http(f"{server.url}{path}", method=method)
    assert reply.status == 405 and reply.headers["allow"] == "GET"
    assert reply.json() == {"error": f"{path} accepts GET only"}


@pytest.mark.parametrize("content_type, body", [
    ("image/jpeg", PHOTO), ("image/png", PNG_RGBA), ("application/x-image", GREY),
    ("application/octet-stream", PALETTE), ("image/jpeg; charset=binary", PHOTO)])
def test_raw_images_give_the_original_answer(server, local_model, content_type, body):
    reply = server.invoke(body, content_type)
    assert reply.status == 200 and reply.headers["content-type"] == "application/json"
    scores = reply.json()
    assert np.shape(scores) == (1, 5)
    np.testing.assert_allclose(scores, expected_logits(local_model, body), rtol=1e-5, atol=1e-5)


def server_timing_ms(reply) -> float:
    """The worker's duration from `Server-Timing: worker;dur=<ms>, <stage>;dur=<ms>, ...`."""
    name, _, duration = reply.headers["server-timing"].split(",")[0].partition(";dur=")
    assert name == "worker", reply.headers["server-timing"]
    return float(duration)


def test_every_answer_says_how_long_the_worker_took(server):
    began = time.perf_counter()
    good = server.invoke(PHOTO, "image/jpeg")
    elapsed_ms = (time.perf_counter() - began) * 1000
    assert good.status == 200
    assert 0 < server_timing_ms(good) <= elapsed_ms
    refused = server.invoke(b"not an image", "image/jpeg")
    assert refused.status == 400 and server_timing_ms(refused) > 0


def test_json_forms_and_batching(server, local_model, image_host):
    single = server.invoke(json.dumps({"image": b64(PHOTO)}).encode(), "application/json; charset=utf-8")
    np.testing.assert_allclose(single.json(), expected_logits(local_model, PHOTO), rtol=1e-5, atol=1e-5)
    # Several images, one forward pass: the same scores as one by one.
    many = server.invoke(json.dumps({"images": [b64(PHOTO), b64(PNG_RGBA), b64(GREY)]}).encode(), "application/json")
    assert many.status == 200 and np.shape(many.json()) == (3, 5)
    np.testing.assert_allclose(many.json(), expected_logits(local_model, PHOTO, PNG_RGBA, GREY), rtol=1e-4, atol=1e-4)
    # The original clients: {"url": ...}, fetched by the server.
    fetched = server.invoke(json.dumps({"url": f"{image_host}/dog.jpg"}).encode(), "application/json")
    assert fetched.status == 200, fetched.body
    np.testing.assert_allclose(fetched.json(), single.json(), rtol=1e-6)
    # Batch transform lines in, lines out.
    lines = f'{json.dumps({"image": b64(GREY)})}\n{json.dumps({"url": f"{image_host}/dog.jpg"})}\n'
    reply = server.invoke(lines.encode(), "application/jsonlines", accept="application/jsonlines")
    assert reply.status == 200 and reply.headers["content-type"] == "application/jsonlines"
    answers = [json.loads(line) for line in reply.body.decode().splitlines()]
    np.testing.assert_allclose(np.concatenate(answers), expected_logits(local_model, GREY, PHOTO), rtol=1e-4, atol=1e-4)


def test_accept_and_top_k(server, local_model):
    expected = expected_logits(local_model, PHOTO)[0]
    for accept in (None, "*/*", "application/json", "text/html;q=0.1, application/json"):
        reply = server.invoke(PHOTO, accept=accept)
        assert reply.status == 200 and np.shape(reply.json()) == (1, 5), accept
    reply = server.invoke(PHOTO, accept="application/vnd.kennel.topk+json")
    assert reply.headers["content-type"] == "application/vnd.kennel.topk+json"
    (top,) = reply.json()
    assert [entry["index"] for entry in top] == list(np.argsort(-expected))
    probabilities = np.exp(expected - expected.max()) / np.exp(expected - expected.max()).sum()
    assert top[0]["probability"] == pytest.approx(probabilities.max(), rel=1e-4)
    assert top[0]["breed"] == top[0]["class_name"].split(".", 1)[1].replace("_", " ")
    reply = server.invoke(PHOTO, accept="application/json", headers={"X-Amzn-SageMaker-Custom-Attributes": "top_k=2"})
    assert reply.status == 200 and [len(entries) for entries in reply.json()] == [2]


BAD_REQUESTS = [
    ("text/plain", b"hello", None, 415, "not supported"),
    (None, PHOTO, None, 415, "Content-Type"),
    ("application/json; charset=latin-1", b"{}", None, 415, "charset 'latin-1' is not supported"),
    ("image/jpeg", PHOTO, "text/html", 406, "Accept 'text/html'"),
    ("application/json", b'{"url": "http://x", ', None, 400, "not valid JSON"),
    ("application/json", b'{"link": "https://x"}', None, 400, "needs one of the fields url, image, images"),
    ("application/json", b"\xff\xfe\x00{", None, 400, "not valid UTF-8"),
    ("image/jpeg", b"GIF89a but not really", None, 400, "not an image"),
    ("image/jpeg", PHOTO[: len(PHOTO) // 3], None, 400, "truncated or corrupt"),
    ("image/png", BOMB, None, 400, "8000x6000 pixels exceeds the limit"),
    ("application/x-www-form-urlencoded", b"image=abc", None, 415, "not supported"),
    ("application/json", json.dumps({"images": [b64(GREY)] * 9}).encode(), None, 400, "more than the limit of 8"),
    ("image/jpeg", b"", None, 400, "empty"),
    ("application/json", b'{"url": "file:///etc/passwd"}', None, 400, "only http and https"),
]


@pytest.mark.parametrize("content_type, body, accept, status, fragment", BAD_REQUESTS,
                         ids=[f"{case[3]}-{case[4][:24]}" for case in BAD_REQUESTS])
def test_bad_input_is_a_clear_4xx_and_the_server_stays_healthy(server, content_type, body, accept, status, fragment):
    assert_json_error(server.invoke(body, content_type, accept=accept), status, fragment)
    assert server.ping() == 200
    assert server.invoke(PHOTO).status == 200


def test_payload_over_the_limit_is_413(server):
    over = b"\xff\xd8" + b"\0" * (1024 * 1024 + 10)
    assert_json_error(server.invoke(over), 413, "more than the limit of 1048576 bytes")
    # Far beyond it, MMS refuses before buffering the body (no JSON there, still 413).
    assert server.invoke(b"\0" * (3 * 1024 * 1024)).status == 413
    assert server.invoke(PHOTO).status == 200


@pytest.mark.parametrize("target, fragment", [
    ("http://[::1]:9/dog.jpg", "::1 is a loopback address"),
    ("http://127.0.0.2:9/dog.jpg", "127.0.0.2 is a loopback address"),  # only 127.0.0.1 is allowed
    ("http://169.254.169.254/latest/meta-data/", "instance metadata service"),
    ("http://10.11.12.13/dog.jpg", "private address"),
    ("{host}/redirect?to=http://169.254.169.254/latest/", "instance metadata service"),
    ("{host}/redirect?to=http://[::1]:9/x", "loopback"),
    ("{host}/redirect?to=ftp://example.com/x", "only http and https"),
    ("{host}/loop/0", "more than 2 redirects"),
    ("{host}/big", f"more than the limit of {URL_CAP} bytes"),
    ("{host}/big-chunked", f"more than the limit of {URL_CAP} bytes"),
    ("{host}/slow", "no complete answer within 3 s"),
    ("{host}/missing", "HTTP 404"),
    ("https://localhost.invalid./dog.jpg", "cannot be resolved"),
])
def test_url_fetch_refusals(server, image_host, target, fragment):
    url = target.format(host=image_host)
    started = time.monotonic()
    reply = server.invoke(json.dumps({"url": url}).encode(), "application/json")
    assert_json_error(reply, 400, fragment)
    assert reply.json()["error"].startswith("cannot fetch the image URL")
    assert time.monotonic() - started < 10


def test_a_redirect_to_a_malformed_url_is_refused(server, image_host):
    url = f"{image_host}/redirect?to=http://[::1"
    reply = server.invoke(json.dumps({"url": url}).encode(), "application/json")
    assert reply.status == 400, reply.body
    assert "redirect to an invalid URL" in reply.json()["error"]


def test_redirects_within_the_limit_are_followed(server, image_host, local_model):
    url = f"{image_host}/redirect?to=/redirect?to=/dog.jpg"
    reply = server.invoke(json.dumps({"url": url}).encode(), "application/json")
    assert reply.status == 200, reply.body
    np.testing.assert_allclose(reply.json(), expected_logits(local_model, PHOTO), rtol=1e-5, atol=1e-5)
