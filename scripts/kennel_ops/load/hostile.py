"""Generated bad requests for an inference endpoint, and the rule they must meet.

Every case is something a client may send by mistake or on purpose: bytes that
are no image, truncated and corrupted JPEG/PNG, decompression bombs, missing and
unsupported content types, malformed and huge JSON, base64 garbage, image URLs
into loopback, private ranges and the metadata service (directly or through
redirects), other URL schemes, oversized bodies, the model server's management
API. The rule for all of them: an HTTP 4xx answer whose body is a JSON object
with a readable reason (no traceback), quickly.

Image-like cases are kept only when the serving decoder itself
(kennel_artifact.decode_image) refuses them: a corruption that still decodes is
a valid if ugly picture and may rightly be classified, so it is not generated.

URLs are IP literals (some in inet_aton forms such as 127.1, which the C
resolver reads without a query), `localhost` or names given by the caller (a
redirect server on the test's own network): no case makes anything ask DNS.
"""
from __future__ import annotations

import base64
import functools
import io
import json
import random
import socket
import struct
import time
import urllib.parse
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

from PIL import Image

# Addresses a client URL must never reach (loopback, private, link-local, metadata, special).
BLOCKED_URLS = (
    "http://127.0.0.1:8080/ping", "http://127.0.0.1/", "http://localhost:8080/ping", "http://127.1/",
    "http://2130706433/", "http://0x7f000001/", "http://0177.0.0.1/", "http://0.0.0.0:8080/ping",
    "http://[::1]:8080/ping", "http://[::ffff:127.0.0.1]:8080/", "http://[0:0:0:0:0:ffff:7f00:1]/",
    "https://127.0.0.1:8443/photo.jpg", "http://user:secret@127.0.0.1:8080/", "http://localhost./",
    "http://10.0.0.1/", "http://10.255.255.254/photo.jpg", "http://172.16.0.1/", "http://172.31.255.1/x.jpg",
    "http://192.168.0.1/", "http://192.168.255.254:8080/", "http://[fd00::1]/", "http://[fc00::abcd]/",
    "http://169.254.169.254/latest/meta-data/", "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "http://169.254.169.254/latest/api/token", "http://[fd00:ec2::254]/latest/meta-data/",
    "http://169.254.170.2/v2/credentials", "http://[fe80::1]/", "http://169.254.0.1/",
    "http://224.0.0.1/", "http://255.255.255.255/", "http://0.0.0.0/", "http://[::]/",
    "http://[::ffff:169.254.169.254]/latest/meta-data/", "http://[2002:a9fe:a9fe::]/",
)
# Not http(s), or not a URL a fetcher can use.
BAD_SCHEME_URLS = (
    "file:///etc/passwd", "file:///opt/ml/model/model.onnx", "file://localhost/etc/shadow", "ftp://127.0.0.1/x.jpg",
    "gopher://127.0.0.1:8080/_GET%20/ping", "dict://127.0.0.1:11211/stats", "ldap://127.0.0.1/",
    "jar:http://127.0.0.1!/", "data:image/jpeg;base64,/9j/4AAQ", "javascript:alert(1)", "httpx://127.0.0.1/",
    "//127.0.0.1/photo.jpg", "127.0.0.1/photo.jpg", "http://", "http:///photo.jpg", "http://[::1",
    "http://127.0.0.1:99999/", "http://127.0.0.1:-1/", "http://[not-an-address]/", "\x00http://127.0.0.1/",
    " ", "h" * 5000,
)
UNSUPPORTED_TYPES = (
    "text/plain", "text/html", "application/xml", "text/csv", "multipart/form-data; boundary=xyz",
    "application/x-www-form-urlencoded", "video/mp4", "audio/mpeg", "application/pdf", "application/zip",
    "application/x-npy", "application/jsonp", "*/*", "application", "image", "/", ";", "json",
)
IMAGE_TYPES = ("image/jpeg", "image/png", "application/x-image", "application/octet-stream", "image/webp")


@dataclass(frozen=True)
class Case:
    """One request: POST path with headers and body (or a raw byte stream for protocol-level cases)."""

    category: str
    description: str
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    method: str = "POST"
    path: str = "/invocations"


@dataclass(frozen=True)
class Answer:
    case: Case
    status: int  # 0: no HTTP answer
    body: bytes
    seconds: float
    error: str | None = None  # transport failure


def refusal_problem(status: int, body: bytes) -> str | None:
    """None when the answer is a 4xx with a JSON reason and no traceback, else what is wrong."""
    if not 400 <= status < 500:
        return f"HTTP {status}" if status else "no HTTP answer"
    text = body.decode("utf-8", "replace")
    if "Traceback" in text or 'File "/' in text:
        return "a traceback in the body"
    try:
        data = json.loads(text)
    except ValueError:
        return f"HTTP {status} with a body that is not JSON: {text[:80]!r}"
    if not isinstance(data, dict):
        return f"HTTP {status} with JSON that is not an object"
    if not any(isinstance(v, str) and len(v.strip()) >= 3 for v in data.values()):
        return f"HTTP {status} with no readable reason: {text[:80]!r}"
    return None


# ---------------------------------------------------------------- image material

def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _refused_by_decoder(data: bytes) -> bool:
    """True when the serving decoder refuses these bytes (so a 4xx is the only right answer)."""
    import warnings

    from kennel_artifact import decode_image
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's DecompressionBombWarning: bombs are the point here
        try:
            decode_image(data)
        except Exception:  # noqa: BLE001 - any refusal counts; the server must turn it into a 4xx
            return True
    return False


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose header declares width x height (grey, 8 bit) with the given pixel stream."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat or zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


@functools.lru_cache(maxsize=1)
def zlib_bomb_png() -> bytes:
    """A real decompression bomb: 12000 x 12000 grey zeros (144 MB of pixels) in about 140 KB."""
    width = height = 12000
    row = b"\0" * (width + 1)
    compressor = zlib.compressobj(9)
    stream = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return png_declaring(width, height, stream)


def jpeg_declaring(jpeg: bytes, width: int, height: int) -> bytes:
    """The JPEG with its frame header (SOF0/1/2) patched to claim width x height."""
    data = bytearray(jpeg)
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            break
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            data[i + 5:i + 9] = struct.pack(">HH", height, width)
            return bytes(data)
        i += 2 + length
    raise ValueError("no frame header found")


class Material:
    """Good images to corrupt, made once per generator."""

    def __init__(self, photo: bytes):
        self.jpeg = photo
        with Image.open(io.BytesIO(photo)) as image:
            small = image.convert("RGB").resize((160, 120))
        self.png = _encode(small, "PNG")
        self.palette_png = _encode(small.convert("P"), "PNG")
        self.gif = _encode(small.convert("P"), "GIF")


# ---------------------------------------------------------------- the generators

def _random_bytes(rng: random.Random, m: Material) -> Case:
    size = rng.choice([1, 2, 16, 100, 1000, 10_000, 100_000])
    prefix = rng.choice([b"", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"RIFF\0\0\0\0WEBP", b"BM"])
    body = prefix + rng.randbytes(size)
    return Case("random bytes", f"{len(body)} random bytes after {prefix[:4]!r}", body,
                {"Content-Type": rng.choice(IMAGE_TYPES)})


def _truncated(rng: random.Random, m: Material) -> Case:
    source, fmt = rng.choice([(m.jpeg, "JPEG"), (m.png, "PNG"), (m.palette_png, "PNG"), (m.gif, "GIF")])
    cut = rng.randint(0, int(len(source) * 0.9))
    return Case("truncated image", f"{fmt} cut at {cut} of {len(source)} bytes", source[:cut],
                {"Content-Type": rng.choice(IMAGE_TYPES)})


def _corrupted(rng: random.Random, m: Material) -> Case:
    source, fmt = rng.choice([(m.jpeg, "JPEG"), (m.png, "PNG"), (m.gif, "GIF")])
    data = bytearray(source)
    how = rng.choice(["header bytes", "spread bytes", "zeroed block", "swapped halves", "spliced formats"])
    if how == "header bytes":
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(2, min(len(data), 700))] = rng.randrange(256)
    elif how == "spread bytes":
        for _ in range(rng.randint(50, 500)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif how == "zeroed block":
        start = rng.randrange(len(data) // 2)
        data[start:start + rng.randint(64, 4096)] = bytes(min(len(data) - start, 4096))
    elif how == "swapped halves":
        half = len(data) // 2
        data = data[:16] + data[half:] + data[16:half]
    else:
        other = rng.choice([m.png, m.jpeg, m.gif])
        data = data[: rng.randint(8, 400)] + other[rng.randint(8, 400):]
    return Case("corrupted image", f"{fmt} with {how}", bytes(data), {"Content-Type": rng.choice(IMAGE_TYPES)})


def _bomb(rng: random.Random, m: Material) -> Case:
    kind = rng.choice(["png header", "jpeg header", "zlib bomb", "gif header", "zero size"])
    if kind == "png header":
        side = rng.choice([7000, 20_000, 65_535, 1_000_000, 2**31 - 1])
        body = png_declaring(side, rng.choice([side, 7000]))
    elif kind == "jpeg header":
        side = rng.choice([7000, 20_000, 65_535])
        body = jpeg_declaring(m.jpeg, side, side)
    elif kind == "zlib bomb":
        body = zlib_bomb_png()
    elif kind == "gif header":
        body = b"GIF89a" + struct.pack("<HH", 65_535, 65_535) + m.gif[10:]
    else:
        body = png_declaring(0, rng.choice([0, 100]))
    return Case("decompression bomb", kind, body, {"Content-Type": rng.choice(IMAGE_TYPES)})


def _content_type(rng: random.Random, m: Material) -> Case:
    kind = rng.choice(["unsupported", "unsupported", "missing", "charset"])
    if kind == "unsupported":
        media_type = rng.choice(UNSUPPORTED_TYPES)
        return Case("content type", f"a JPEG sent as {media_type!r}", m.jpeg, {"Content-Type": media_type})
    if kind == "missing":
        body = rng.choice([b"\x00" * 10, rng.randbytes(100), b'{"url": "http://127.0.0.1/"}'])
        return Case("content type", "no Content-Type header", body, {})
    charset = rng.choice(["utf-16", "latin-1", "ebcdic", "x" * 40])
    return Case("content type", f"JSON with charset {charset}", b'{"url": "http://127.0.0.1/"}',
                {"Content-Type": f"application/json; charset={charset}"})


def _json(rng: random.Random, m: Material) -> Case:
    kind = rng.choice(["malformed", "shape", "shape", "deep", "huge", "not utf-8", "too many images"])
    if kind == "malformed":
        body = rng.choice([b"{", b"{'url': 'x'}", b'{"url": }', b"[1, 2,", b"nul", b'{"url": "x"}}', b"\xef\xbb\xbf{",
                           b'{"url": "x", }', b"NaN", b'"\\ud800"', b"{}" * 100])
    elif kind == "shape":
        body = json.dumps(rng.choice([
            {}, [], "http://127.0.0.1/", 42, None, True, {"url": None}, {"url": 42}, {"url": ""}, {"url": ["x"]},
            {"image": None}, {"image": 7}, {"images": []}, {"images": "abc"}, {"images": [None]}, {"images": {}},
            {"url": "http://127.0.0.1/", "image": "AAAA"}, {"instances": [[0.0] * 10]}, {"URL": "x"},
            {"inputs": "x"}, [{"url": "http://127.0.0.1/"}],
        ])).encode()
    elif kind == "deep":
        depth = rng.choice([1000, 10_000, 100_000])
        body = (b"[" * depth + b"]" * depth) if rng.random() < 0.5 else (b'{"a":' * depth + b"1" + b"}" * depth)
    elif kind == "huge":
        size = rng.choice([1_000_000, 5_000_000])
        body = rng.choice([
            json.dumps({"url": "http://127.0.0.1/" + "a" * size}).encode(),
            json.dumps({"image": "A" * size + "!"}).encode(),
            json.dumps({"pad": "x" * size}).encode(),
            json.dumps([0] * (size // 2)).encode(),
        ])
    elif kind == "not utf-8":
        body = b'{"url": "http://127.0.0.1/\xff\xfe"}'
    else:
        photo = base64.b64encode(m.png[:200]).decode()
        body = json.dumps({"images": [photo] * rng.choice([33, 100, 1000])}).encode()
    return Case("bad JSON", kind, body, {"Content-Type": rng.choice(["application/json", "application/json; charset=utf-8"])})


def _base64(rng: random.Random, m: Material) -> Case:
    kind = rng.choice(["alphabet", "garbage bytes", "truncated image", "data uri", "one bad in many"])
    good = base64.b64encode(m.jpeg).decode()
    if kind == "alphabet":
        value = rng.choice(["!!!!", "@@@@", "####" * 10, "Zm9v$", "\u00e9\u00e9\u00e9\u00e9", "AAA=AAA=", "=", "===="])
    elif kind == "garbage bytes":
        value = base64.b64encode(rng.randbytes(rng.choice([1, 50, 5000]))).decode()
    elif kind == "truncated image":
        value = good[: rng.randint(4, len(good) // 2) // 4 * 4]
    elif kind == "data uri":
        value = rng.choice(["data:image/jpeg,not-base64", "data:", "data:image/jpeg;base64", "data:;base64,!!!!"])
    else:
        return Case("base64 garbage", kind, json.dumps({"images": [good, good, "!!!!", good]}).encode(),
                    {"Content-Type": "application/json"})
    return Case("base64 garbage", kind, json.dumps({"image": value}).encode(), {"Content-Type": "application/json"})


def _url(rng: random.Random, m: Material) -> Case:
    url = rng.choice(BLOCKED_URLS + BAD_SCHEME_URLS)
    category = "URL into a blocked address" if url in BLOCKED_URLS else "URL scheme or syntax"
    return Case(category, url[:80], json.dumps({"url": url}).encode(),
                {"Content-Type": rng.choice(["application/json", "application/json; charset=utf-8"])})


def _oversized(rng: random.Random, m: Material) -> Case:
    size = rng.choice([7 * 2**20, 10 * 2**20])
    body = (m.jpeg * (size // len(m.jpeg) + 1))[:size]
    return Case("oversized body", f"{size} bytes", body, {"Content-Type": rng.choice(IMAGE_TYPES)})


def _accept(rng: random.Random, m: Material) -> Case:
    accept = rng.choice(["text/html", "application/xml", "image/png", "text/csv", "application/x-npy", "nothing/at-all"])
    return Case("unsupported Accept", accept, m.jpeg, {"Content-Type": "image/jpeg", "Accept": accept})


def _management(rng: random.Random, m: Material) -> Case:
    method, path = rng.choice([
        ("DELETE", "/models/model"), ("DELETE", "/models/kennel"), ("GET", "/models"),
        ("POST", "/models?url=http%3A%2F%2F169.254.169.254%2Flatest%2Fmeta-data%2F"),
        ("POST", "/models?url=file%3A%2F%2F%2Fopt%2Fml%2Fmodel"), ("PUT", "/models/model?min_worker=0"),
        ("GET", "/invocations"), ("PUT", "/invocations"), ("DELETE", "/invocations"), ("POST", "/ping"),
        ("GET", "/../../etc/passwd"), ("GET", "/predictions/model"), ("POST", "/nothing-here"),
        ("OPTIONS", "/models"),
    ])
    return Case("management API and methods", f"{method} {path}", b"" if method in ("GET", "DELETE", "OPTIONS")
                else b"{}", {"Content-Type": "application/json"}, method=method, path=path)


GENERATORS: dict[str, tuple[Callable[[random.Random, Material], Case], int]] = {
    # name: (generator, weight)
    "random bytes": (_random_bytes, 12),
    "truncated image": (_truncated, 12),
    "corrupted image": (_corrupted, 12),
    "decompression bomb": (_bomb, 8),
    "content type": (_content_type, 10),
    "bad JSON": (_json, 10),
    "base64 garbage": (_base64, 8),
    "URL": (_url, 14),
    "oversized body": (_oversized, 1),
    "unsupported Accept": (_accept, 4),
    "management API": (_management, 6),
}
IMAGE_CATEGORIES = {"random bytes", "truncated image", "corrupted image", "decompression bomb"}


def generate(count: int, photo: bytes, seed: int = 0, redirect_base: str | None = None) -> Iterator[Case]:
    """count bad requests drawn by weight (every generator at least once when count allows).

    redirect_base: an allowed server on the test's network with /redirect?to=URL; when
    given, URL cases also go through a redirect into the blocked address.
    """
    rng = random.Random(seed)
    material = Material(photo)
    names = list(GENERATORS)
    weights = [GENERATORS[n][1] for n in names]
    for i in range(count):
        name = names[i] if i < len(names) else rng.choices(names, weights)[0]
        generator = GENERATORS[name][0]
        for _ in range(50):
            case = generator(rng, material)
            if name not in IMAGE_CATEGORIES or _refused_by_decoder(case.body):
                break
        else:
            raise RuntimeError(f"{name}: no refused variant in 50 tries")
        target = json.loads(case.body)["url"] if name == "URL" else ""
        if redirect_base and _absolute(target) and rng.random() < 0.5:
            via = f"{redirect_base}/redirect?to={urllib.parse.quote(target, safe='')}"
            case = Case("redirect into a blocked target", f"redirect -> {target[:60]}", json.dumps({"url": via}).encode(),
                        {"Content-Type": "application/json"})
        yield case


def _absolute(url: str) -> bool:
    """A Location that stays absolute after urljoin (a relative one rightly lands on the redirect server)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return True  # malformed but absolute ("http://[not-an-address]/"): must be refused, not crash
    return bool(parts.netloc or (parts.scheme and parts.scheme not in ("http", "https")))


# ---------------------------------------------------------------- sending

def send(host: str, port: int, case: Case, timeout_s: float = 30.0) -> Answer:
    """One case on a fresh connection (a refused request may close it)."""
    import http.client
    began = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.putrequest(case.method, case.path, skip_accept_encoding=True)
        headers = dict(case.headers)
        headers.setdefault("Content-Length", str(len(case.body)))
        if "Accept" not in headers and case.method == "POST":
            headers["Accept"] = "application/json"
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        try:
            if case.body:
                conn.send(case.body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered (413) and closed before reading everything: read that answer
        response = conn.getresponse()
        body = response.read()
        return Answer(case, response.status, body, time.perf_counter() - began)
    except (OSError, http.client.HTTPException) as exc:
        return Answer(case, 0, b"", time.perf_counter() - began, f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()


def send_raw(host: str, port: int, chunks: list[bytes], pause_s: float = 0.0, timeout_s: float = 30.0,
             category: str = "raw", description: str = "") -> Answer:
    """Bytes written as given (pause_s between chunks), then the answer read: slow and malformed requests."""
    import http.client
    began = time.perf_counter()
    case = Case(category, description, b"".join(chunks))
    sock = socket.create_connection((host, port), timeout=timeout_s)
    try:
        for i, chunk in enumerate(chunks):
            if i and pause_s:
                time.sleep(pause_s)
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break  # answered early
        response = http.client.HTTPResponse(sock, method="POST")
        response.begin()
        body = response.read()
        return Answer(case, response.status, body, time.perf_counter() - began)
    except (OSError, http.client.HTTPException) as exc:
        return Answer(case, 0, b"", time.perf_counter() - began, f"{type(exc).__name__}: {exc}")
    finally:
        sock.close()


def request_bytes(body: bytes, content_type: str = "image/jpeg", length: int | None = None,
                  extra_headers: str = "", path: str = "/invocations") -> bytes:
    """The head of a POST (Content-Length = length, default the body's) followed by nothing: send the body yourself."""
    length = len(body) if length is None else length
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Accept: application/json\r\nContent-Length: {length}\r\n{extra_headers}\r\n").encode()
