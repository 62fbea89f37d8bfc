"""URL fetching over real sockets on 127.0.0.1: one deadline bounds every hop, and whatever
an image server sends ends as a 400, never as an exception the toolkit turns into a 500."""
from __future__ import annotations

import gc
import ipaddress
import os
import socket
import threading
import time
import warnings
from typing import Callable

import pytest

from kennel_serve.mms_toolkit.errors import RequestError
from kennel_serve.settings import UrlFetchSettings
from kennel_serve.url_fetch import UrlFetcher

DEADLINE_S = 1.0
SLACK_S = 1.5  # generous: a refusal must come within the deadline plus this
LOOPBACK = UrlFetchSettings(allowed_networks=(ipaddress.ip_network("127.0.0.1/32"),), timeout_s=DEADLINE_S)

Script = Callable[[socket.socket, threading.Event], None]


class ImageHost:
    """A server on 127.0.0.1 that reads each request and answers it with script(conn, stop)."""

    def __init__(self, script: Script, read_request: bool = True):
        self.script = script
        self.read_request = read_request
        self.requests: list[bytes] = []
        self.connections = 0
        self.stop = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except (socket.timeout, OSError):
                continue
            self.connections += 1
            handler = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            self.threads.append(handler)
            handler.start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(0.05)
            if self.read_request:
                head = b""
                while b"\r\n\r\n" not in head and not self.stop.is_set():
                    try:
                        data = conn.recv(4096)
                    except socket.timeout:
                        continue
                    except OSError:
                        return
                    if not data:
                        return
                    head += data
                self.requests.append(head)
            try:
                self.script(conn, self.stop)
            except OSError:
                pass  # the fetcher hung up, as it should at its deadline

    def close(self) -> None:
        self.stop.set()
        for thread in list(self.threads):
            thread.join(timeout=5)
        self.listener.close()


@pytest.fixture
def image_host():
    hosts: list[ImageHost] = []

    def start(script: Script, read_request: bool = True) -> ImageHost:
        hosts.append(ImageHost(script, read_request))
        return hosts[-1]

    yield start
    for host in hosts:
        host.close()


def send(data: bytes) -> Script:
    def script(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(data)
    return script


def drip(prefix: bytes, dripped: bytes, every_s: float = 0.3) -> Script:
    """Send prefix at once, then one byte of dripped every every_s: each recv is quick, the whole never ends."""
    def script(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(prefix)
        for byte in dripped:
            if stop.wait(every_s):
                return
            conn.sendall(bytes([byte]))
        stop.wait()
    return script


def stall(conn: socket.socket, stop: threading.Event) -> None:
    stop.wait()


def refused_in_time(fetcher: UrlFetcher, url: str, deadline: float | None = None, bound_s: float | None = None) -> str:
    started = time.monotonic()
    with pytest.raises(RequestError) as caught:
        fetcher.fetch(url, deadline)
    elapsed = time.monotonic() - started
    assert caught.value.status_code == 400
    assert elapsed < (bound_s if bound_s is not None else DEADLINE_S + SLACK_S), (elapsed, caught.value.message)
    assert caught.value.message.startswith("cannot fetch the image URL: ")
    return caught.value.message


OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n"


# -- the deadline --------------------------------------------------------------------

@pytest.mark.parametrize("script", [
    drip(b"", b"HTTP/1.1 200 OK\r\n" * 4),  # the status line
    drip(OK_HEAD + b"X-Padding: ", b"a" * 100),  # a header
    drip(b"", b"HTTP/1.1 100 Continue\r\n\r\n" * 20, every_s=0.05),  # endless 100s
    drip(OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n", b"0" * 100),  # a chunk-size line
    drip(OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n", b"1\r\na\r\n" * 100, every_s=0.05),  # chunks, each quick
    drip(OK_HEAD + b"Content-Length: 1000\r\n\r\n", b"a" * 1000),  # the body
    drip(OK_HEAD + b"\r\n", b"a" * 1000),  # a body sent until close
    stall,  # no answer at all
], ids=["status-line", "header", "100-continue", "chunk-size", "chunks", "body", "body-until-close", "stall"])
def test_a_slow_server_is_cut_off_at_the_deadline(image_host, script):
    host = image_host(script)
    message = refused_in_time(UrlFetcher(LOOPBACK), f"{host.url}/dog.jpg")
    assert "no complete answer within 1 s" in message


def test_a_tls_server_that_never_answers_the_handshake_is_cut_off(image_host):
    host = image_host(stall, read_request=False)
    message = refused_in_time(UrlFetcher(LOOPBACK), f"https://127.0.0.1:{host.port}/dog.jpg")
    assert "no complete answer within 1 s" in message


def test_a_tls_handshake_dripped_byte_by_byte_is_cut_off(image_host):
    # A TLS record header trickling in: every recv returns quickly, the handshake never completes.
    host = image_host(drip(b"", b"\x16\x03\x03\x40\x00" + b"\x02" * 100), read_request=False)
    message = refused_in_time(UrlFetcher(LOOPBACK), f"https://127.0.0.1:{host.port}/dog.jpg")
    assert "no complete answer" in message


def test_a_hung_resolver_does_not_hold_the_request():
    released = threading.Event()
    calls = []

    def hung_resolver(host, port, type=0):
        calls.append(host)
        released.wait(10)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    try:
        message = refused_in_time(UrlFetcher(LOOPBACK, hung_resolver), "http://slow-dns.example/dog.jpg")
    finally:
        released.set()
    assert calls == ["slow-dns.example"]
    assert "no complete answer within 1 s" in message


def test_the_urls_of_one_request_share_one_deadline(image_host):
    fetcher = UrlFetcher(LOOPBACK)
    hosts = [image_host(drip(OK_HEAD + b"X-Padding: ", b"a" * 100)) for _ in range(3)]
    deadline = fetcher.request_deadline()
    started = time.monotonic()
    for host in hosts:
        assert "no complete answer" in refused_in_time(fetcher, f"{host.url}/dog.jpg", deadline)
    assert time.monotonic() - started < DEADLINE_S + SLACK_S
    # The first URL used the time up: the others are refused without a connection.
    assert [host.connections for host in hosts] == [1, 0, 0]


def test_a_passed_deadline_is_refused_without_resolving_or_connecting(image_host):
    resolved = []
    fetcher = UrlFetcher(LOOPBACK, lambda *args, **kwargs: resolved.append(args) or [])
    host = image_host(send(OK_HEAD + b"Content-Length: 3\r\n\r\nabc"))
    late = time.monotonic() - 0.001
    assert "no complete answer" in refused_in_time(fetcher, f"{host.url}/dog.jpg", late, bound_s=0.5)
    assert "no complete answer" in refused_in_time(fetcher, "http://dogs.example/dog.jpg", late, bound_s=0.5)
    assert host.connections == 0 and resolved == []


def test_a_quick_server_is_served_and_nothing_is_left_behind(image_host):
    host = image_host(send(OK_HEAD + b"Content-Length: 5\r\n\r\nwoof!"))
    fetcher = UrlFetcher(LOOPBACK)
    assert fetcher.fetch(f"{host.url}/dog.jpg") == b"woof!"
    assert fetcher.fetch(f"{host.url}/dog.jpg", fetcher.request_deadline()) == b"woof!"


def test_slow_fetches_leave_no_thread_and_no_socket_behind(image_host):
    def threads() -> set[threading.Thread]:
        # The resolver pool keeps its few threads for the next request.
        return {thread for thread in threading.enumerate() if not thread.name.startswith("kennel-url-resolve")}

    def sockets() -> set[str]:
        gc.collect()  # sockets other tests dropped close now, not in the middle of this one
        links = set()
        for fd in os.listdir("/proc/self/fd"):
            try:
                links.add(os.readlink(f"/proc/self/fd/{fd}"))
            except FileNotFoundError:
                pass  # the descriptor listdir itself read through
        return {link for link in links if link.startswith("socket:")}

    before_threads, before_sockets = threads(), sockets()
    hosts = [image_host(drip(OK_HEAD + b"X-Padding: ", b"a" * 100)), image_host(stall, read_request=False),
             image_host(send(OK_HEAD + b"Content-Length: 2\r\n\r\nok"))]
    fetcher = UrlFetcher(LOOPBACK)
    with warnings.catch_warnings(record=True) as caught:
        # A socket closed only by the garbage collector says so with a ResourceWarning.
        warnings.simplefilter("always", ResourceWarning)
        refused_in_time(fetcher, f"{hosts[0].url}/a.jpg")
        refused_in_time(fetcher, f"https://127.0.0.1:{hosts[1].port}/b.jpg")
        assert fetcher.fetch(f"{hosts[2].url}/c.jpg") == b"ok"
        gc.collect()
    assert [str(warning.message) for warning in caught if warning.category is ResourceWarning] == []
    for host in hosts:
        host.close()
    assert threads() == before_threads
    assert sockets() <= before_sockets


# -- what the server sends ------------------------------------------------------------------

@pytest.mark.parametrize("value", [
    b"\xb2",  # '²' in ISO-8859-1: str.isdigit() says yes, int() says no
    "²".encode(), b"-5", b"+5", b"abc", b"1e3", b"0x10", b"10, 20", b"5 5", b"", b"\xd9\xa3",
])
def test_an_invalid_content_length_is_a_400(image_host, value):
    host = image_host(send(OK_HEAD + b"Content-Length: " + value + b"\r\n\r\nabcde"))
    message = refused_in_time(UrlFetcher(LOOPBACK), f"{host.url}/dog.jpg")
    assert message.endswith("the image server sent an invalid Content-Length")


def test_conflicting_content_length_headers_are_a_400(image_host):
    host = image_host(send(OK_HEAD + b"Content-Length: 5\r\nContent-Length: 3\r\n\r\nabcde"))
    assert "invalid Content-Length" in refused_in_time(UrlFetcher(LOOPBACK), f"{host.url}/dog.jpg")


@pytest.mark.parametrize("value", [b"9" * 30, b"1" + b"0" * 5000, b"9" * 60000])
def test_a_content_length_beyond_any_cap_is_a_400(image_host, value):
    host = image_host(send(OK_HEAD + b"Content-Length: " + value + b"\r\n\r\nabcde"))
    message = refused_in_time(UrlFetcher(LOOPBACK), f"{host.url}/dog.jpg")
    assert f"more than the limit of {LOOPBACK.max_bytes} bytes" in message


@pytest.mark.parametrize("value, body", [(b"5", b"abcde"), (b"005", b"abcde"), (b"5, 5", b"abcde"), (b"0", b"")])
def test_a_valid_content_length_is_read(image_host, value, body):
    host = image_host(send(OK_HEAD + b"Content-Length: " + value + b"\r\n\r\n" + body))
    assert UrlFetcher(LOOPBACK).fetch(f"{host.url}/dog.jpg") == body


@pytest.mark.parametrize("answer, fragment", [
    (b"garbage\r\n\r\n", "not valid HTTP"),
    (b"HTTP/1.1 abc OK\r\n\r\n", "not valid HTTP"),
    (b"HTTP/1.1 200 " + b"x" * 70000 + b"\r\n\r\n", "not valid HTTP"),
    (OK_HEAD + b"X-Long: " + b"x" * 70000 + b"\r\n\r\n", "not valid HTTP"),
    (OK_HEAD + b"".join(b"X-%d: 1\r\n" % n for n in range(120)) + b"\r\n", "not valid HTTP"),
    (b"", "closed the connection without an answer"),
    (OK_HEAD + b"Content-Length: 100\r\n\r\nonly this", "before the whole image arrived"),
    (OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", "chunked framing is invalid"),
    (OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n-5\r\nabcdefgh\r\n0\r\n\r\n", "chunked framing is invalid"),
    (OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + b"1" * 70000 + b"\r\n", "not valid HTTP"),
    (OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nab", "chunked framing is invalid"),
    (OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + b"f" * 40 + b"\r\nabc", "chunked framing is invalid"),
    (b"HTTP/1.1 302 Found\r\nLocation: http://[::1\r\n\r\n", "redirect to an invalid URL"),
    (b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:99999/\r\n\r\n", "malformed"),
    (b"HTTP/1.1 302 Found\r\nLocation: gopher://127.0.0.1/\r\n\r\n", "not gopher"),
    (b"HTTP/1.1 302 Found\r\nLocation: http://10.0.0.1/x\r\n\r\n", "10.0.0.1 is a private address"),
    (b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n", "HTTP 503"),
], ids=lambda value: value[:30] if isinstance(value, bytes) else value)
def test_whatever_the_server_sends_is_a_400(image_host, answer, fragment):
    host = image_host(send(answer))
    assert fragment in refused_in_time(UrlFetcher(LOOPBACK), f"{host.url}/dog.jpg")


def test_a_chunked_body_is_read(image_host):
    host = image_host(send(OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"))
    assert UrlFetcher(LOOPBACK).fetch(f"{host.url}/dog.jpg") == b"abcde"


def test_a_path_beyond_ascii_is_sent_percent_encoded(image_host):
    host = image_host(send(OK_HEAD + b"Content-Length: 2\r\n\r\nok"))
    assert UrlFetcher(LOOPBACK).fetch(f"{host.url}/hunde/möpse 1.jpg?größe=2&a=%41") == b"ok"
    assert host.requests[0].startswith(b"GET /hunde/m%C3%B6pse%201.jpg?gr%C3%B6%C3%9Fe=2&a=%41 HTTP/1.1\r\n")


def test_redirects_share_the_deadline_too(image_host):
    slow = image_host(drip(OK_HEAD + b"X-Padding: ", b"a" * 100))
    hops = image_host(send(b"HTTP/1.1 302 Found\r\nLocation: " + slow.url.encode() + b"/x\r\n\r\n"))
    assert "no complete answer" in refused_in_time(UrlFetcher(LOOPBACK), f"{hops.url}/dog.jpg")


def test_connection_failures_name_neither_host_nor_cause(caplog):
    caplog.set_level("INFO", logger="kennel_serve.url_fetch")
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    message = refused_in_time(UrlFetcher(LOOPBACK), f"http://127.0.0.1:{port}/dog.jpg")
    assert message.endswith("could not connect to the image server")
    assert "refused" not in message.lower().replace("cannot fetch", "")
    assert f"127.0.0.1 (127.0.0.1) port {port}" in caplog.text and "ConnectionRefusedError" in caplog.text


def test_a_name_that_does_not_resolve_is_refused_without_the_name(caplog):
    caplog.set_level("INFO", logger="kennel_serve.url_fetch")

    def no_such_name(host, port, type=0):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    message = refused_in_time(UrlFetcher(LOOPBACK, no_such_name), "http://vault.corp.internal/x")
    assert message.endswith("the URL's host name cannot be resolved") and "vault" not in message
    assert "vault.corp.internal" in caplog.text
