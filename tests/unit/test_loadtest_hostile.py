"""The hostile-request generator: every category, only inputs the decoder refuses,
the refusal rule, and the raw senders against a real local server."""
import io
import json
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

import kennel_artifact as ka
from kennel_ops.load import hostile
from kennel_ops.load.payloads import dog_photos


@pytest.fixture(scope="module")
def photo():
    return dog_photos(1)[0]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_every_category_is_generated_and_image_cases_are_refused_by_the_decoder(photo):
    cases = list(hostile.generate(400, photo, seed=3))
    counts = Counter(c.category for c in cases)
    for category in ("random bytes", "truncated image", "corrupted image", "decompression bomb", "content type",
                     "bad JSON", "base64 garbage", "URL into a blocked address", "URL scheme or syntax",
                     "oversized body", "unsupported Accept", "management API and methods"):
        assert counts[category] >= 1, category
    for case in cases:
        if case.category in hostile.IMAGE_CATEGORIES:
            with pytest.raises(ka.ImageError):
                ka.decode_image(case.body)
    assert len({c.body for c in cases if c.category == "random bytes"}) > counts["random bytes"] * 0.8


def test_redirect_cases_go_through_the_given_server(photo):
    cases = [c for c in hostile.generate(600, photo, redirect_base="http://redirector:8000")
             if c.category == "redirect into a blocked target"]
    assert cases
    import urllib.parse
    for case in cases:
        via = json.loads(case.body)["url"]
        assert via.startswith("http://redirector:8000/redirect?to=")
        target = urllib.parse.unquote(via.split("to=", 1)[1])
        # a relative Location would rightly land on the redirect server itself: never generated
        assert target not in ("http://", "http:///photo.jpg", " ", "127.0.0.1/photo.jpg")
        assert hostile._absolute(target)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bombs_declare_more_pixels_than_the_limit_in_a_small_body(photo):
    bomb = hostile.zlib_bomb_png()
    assert len(bomb) < 400_000
    with Image.open(io.BytesIO(bomb)) as image:
        assert image.size[0] * image.size[1] > ka.DEFAULT_MAX_PIXELS
    patched = hostile.jpeg_declaring(photo, 10_000, 9_000)
    with Image.open(io.BytesIO(patched)) as image:
        assert image.size == (10_000, 9_000)
    with pytest.raises(ka.ImageError, match="exceeds the limit"):
        ka.decode_image(patched)


def test_no_url_names_a_host_that_needs_dns():
    import ipaddress
    import urllib.parse
    for url in hostile.BLOCKED_URLS:
        host = urllib.parse.urlsplit(url).hostname.rstrip(".")
        if host == "localhost":
            continue
        try:
            ipaddress.ip_address(host)
        except ValueError:
            socket.inet_aton(host)  # numeric forms the C resolver parses without asking DNS


@pytest.mark.parametrize("status, body, problem", [
    (400, b'{"error": "the bytes are not an image"}', None),
    (404, b'{"code": 404, "type": "NotFound", "message": "no such path"}', None),
    (500, b'{"error": "internal"}', "HTTP 500"),
    (200, b"[[1.0]]", "HTTP 200"),
    (0, b"", "no HTTP answer"),
    (400, b"bad request", "not JSON"),
    (400, b'["x"]', "not an object"),
    (400, b'{"code": 400}', "no readable reason"),
    (415, b'{"error": "Traceback (most recent call last):"}', "traceback"),
])
def test_refusal_rule(status, body, problem):
    result = hostile.refusal_problem(status, body)
    assert (result is None) if problem is None else (problem in result)


class _Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        data = self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({"error": f"got {len(data)} bytes of {self.headers.get('Content-Type')}"}).encode()
        self.send_response(400)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_DELETE = do_POST


@pytest.fixture
def echo():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_send_and_send_raw_read_the_answers(echo):
    answer = hostile.send("127.0.0.1", echo, hostile.Case("c", "d", b"abc", {"Content-Type": "text/plain"}))
    assert answer.status == 400 and b"got 3 bytes of text/plain" in answer.body
    assert hostile.refusal_problem(answer.status, answer.body) is None

    body = b"x" * 1000
    head = hostile.request_bytes(body)
    slow = hostile.send_raw("127.0.0.1", echo, [head] + [body[i:i + 250] for i in range(0, 1000, 250)], pause_s=0.1)
    assert slow.status == 400 and b"got 1000 bytes of image/jpeg" in slow.body and slow.seconds >= 0.4

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free = sock.getsockname()[1]
    refused = hostile.send("127.0.0.1", free, hostile.Case("c", "d", b"x"))
    assert refused.status == 0 and "ConnectionRefused" in refused.error
