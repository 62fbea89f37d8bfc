"""Fetch an image from a client-given URL without becoming a proxy into the network.

The original clients send {"url": "https://..."} and the container downloads it.
Done naively that lets any caller make the endpoint read the instance metadata
service or anything else on its private network. Here:

- only http and https;
- the host name is resolved once per hop and EVERY address it resolves to must be
  public (not loopback, private, link-local, multicast, reserved, unspecified, or
  the metadata service 169.254.169.254 / fd00:ec2::254) unless the allowlist
  (KENNEL_URL_ALLOWLIST: CIDRs and host names) says so; the metadata address is
  only ever allowed by an allowlist entry for exactly that address;
- the connection goes to the address that was checked (the name is not resolved
  again, so DNS rebinding cannot swap in another address); TLS still verifies the
  certificate against the host name;
- a byte cap (checked from a strictly parsed Content-Length and while reading), at
  most N redirects, each one checked again like the first URL.

One deadline per request. The caller takes UrlFetcher.request_deadline() once and
passes it to every fetch of that request, so a jsonlines body of 32 URLs shares the
KENNEL_URL_TIMEOUT_S that a single URL gets. The deadline bounds every hop of every
URL: name resolution (run off-thread, so a hung resolver cannot hold the request),
connect, TLS handshake, status line, headers, body and chunk framing. Socket
timeouts alone cannot do that: each one bounds a single recv, and a server that
drips one byte per recv resets it indefinitely.

What goes back to the caller is only what the caller already knows or what the
image server said (the URL's own mistakes, an address literal's kind, the HTTP
status, the size limit); what the endpoint's own network looks like (the addresses
a name resolves to, which hosts refuse connections) goes to the log only, so an
endpoint in a VPC cannot be used to map its private names.
"""
from __future__ import annotations

import concurrent.futures
import http.client
import ipaddress
import logging
import re
import socket
import ssl
import threading
import time
from typing import Callable
from urllib.parse import quote, urljoin, urlsplit

from kennel_serve.mms_toolkit.errors import RequestError, bad_request
from kennel_serve.settings import UrlFetchSettings

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[..., list]

log = logging.getLogger(__name__)

METADATA_ADDRESSES = (ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254"))
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
_CHUNK = 64 * 1024
_DIGITS = re.compile(r"[0-9]+")
# A Content-Length this long exceeds any byte cap; int() would refuse one beyond 4300 digits anyway.
_LONGEST_LENGTH_DIGITS = 18
# Characters a request target may carry as they are; everything else (non-ASCII, spaces,
# control characters) is percent-encoded, as a browser does before sending the URL.
_TARGET_SAFE = "/?&=%:@!$'()*+,;~[]"
# Resolutions that may run at once in one worker; one that hangs keeps its thread until
# the system resolver gives up, and new ones queue behind it within their own deadline.
_RESOLVER_THREADS = 4

_resolver_pool: concurrent.futures.ThreadPoolExecutor | None = None
_resolver_pool_lock = threading.Lock()


def refused(reason: str) -> RequestError:
    return bad_request(f"cannot fetch the image URL: {reason}")


def address_problem(ip: IpAddress) -> str | None:
    """Why a client URL may not reach this address, or None for a public address."""
    if ip in METADATA_ADDRESSES:
        return "the instance metadata service"
    if ip.version == 6:
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            problem = address_problem(embedded)
            if problem:
                return problem
    for kind in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
        if getattr(ip, f"is_{kind}"):
            return f"a {kind.replace('_', '-')} address"
    if not ip.is_global:
        return "not a public address"
    return None


class UrlFetcher:
    def __init__(self, settings: UrlFetchSettings, resolver: Resolver = socket.getaddrinfo):
        self.settings = settings
        self._resolve = resolver

    def request_deadline(self) -> float:
        """The deadline (time.monotonic()) that all the URLs of one request share."""
        return time.monotonic() + self.settings.timeout_s

    def fetch(self, url: str, deadline: float | None = None) -> bytes:
        """The body the URL answers with (after redirects), or RequestError(400) saying why not.

        deadline: time.monotonic() by which this fetch ends, shared by all the URLs of a
        request (request_deadline()); None gives this URL the whole KENNEL_URL_TIMEOUT_S.
        """
        if not self.settings.enabled:
            raise bad_request("fetching image URLs is turned off on this endpoint (KENNEL_URL_FETCH=false); "
                              "send the image bytes instead")
        if not isinstance(url, str) or not url.strip():
            raise bad_request("the field 'url' must be a non-empty string")
        if deadline is None:
            deadline = self.request_deadline()
        current = url.strip()
        for _ in range(self.settings.max_redirects + 1):
            status, location, body = self._get(current, deadline)
            if status in REDIRECT_STATUSES:
                if not location:
                    raise refused(f"HTTP {status} redirect without a Location")
                try:
                    current = urljoin(current, location)
                except ValueError:
                    raise refused(f"HTTP {status} redirect to an invalid URL") from None
                continue
            if not 200 <= status < 300:
                raise refused(f"the server answered HTTP {status}")
            return body
        raise refused(f"more than {self.settings.max_redirects} redirects")

    def _out_of_time(self) -> RequestError:
        return refused(f"no complete answer within {self.settings.timeout_s:g} s "
                       "(the time all the image URLs of a request share)")

    # -- one hop -------------------------------------------------------------------------

    def _get(self, url: str, deadline: float) -> tuple[int, str | None, bytes]:
        scheme, host, port, target = self._parse(url)
        if time.monotonic() >= deadline:
            raise self._out_of_time()
        ip = self._checked_address(host, port, deadline)
        sock = self._connect(host, ip, port, deadline)
        watchdog: _Watchdog | None = None
        connection: http.client.HTTPConnection | None = None
        response: http.client.HTTPResponse | None = None
        try:
            watchdog = _Watchdog(sock, deadline)
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            if scheme == "https":
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
            connection = http.client.HTTPConnection(host, port)
            connection.sock = sock  # already connected to the checked address: no second DNS lookup
            connection.putrequest("GET", target, skip_host=True, skip_accept_encoding=True)
            default_port = 443 if scheme == "https" else 80
            connection.putheader("Host", _host_header(host, port, default_port))
            connection.putheader("Accept", "image/*, application/octet-stream;q=0.5")
            connection.putheader("Accept-Encoding", "identity")
            connection.putheader("User-Agent", "kennel-serve")
            connection.putheader("Connection", "close")
            connection.endheaders()
            response = connection.getresponse()
            if response.status in REDIRECT_STATUSES:
                result = response.status, response.getheader("Location"), b""
            elif not 200 <= response.status < 300:
                result = response.status, None, b""
            else:
                result = response.status, None, self._read_body(response, sock, deadline)
            # A shutdown at the deadline can look like the end of a body sent until close.
            if watchdog.fired:
                raise self._out_of_time()
            return result
        except RequestError:
            # A shutdown at the deadline can also look like a truncated body.
            if watchdog is not None and watchdog.fired:
                raise self._out_of_time() from None
            raise
        except (OSError, http.client.HTTPException, ValueError, OverflowError) as exc:
            out_of_time = (watchdog is not None and watchdog.fired) or time.monotonic() >= deadline
            raise self._failure(exc, host, ip, out_of_time) from None
        finally:
            if watchdog is not None:
                watchdog.stop()  # its duplicate descriptor would keep the connection open
            if response is not None:
                response.close()  # with Connection: close the response, not the connection, holds the socket
            if connection is not None:
                connection.close()
            sock.close()

    def _failure(self, exc: Exception, host: str, ip: IpAddress, out_of_time: bool) -> RequestError:
        """The refusal for an exchange that broke off; the details are for the log only."""
        log.info("image URL fetch from %s (%s) failed: %s: %s%s", host, ip, type(exc).__name__, exc,
                 " (deadline)" if out_of_time else "")
        if out_of_time or isinstance(exc, TimeoutError):
            return self._out_of_time()
        if isinstance(exc, ssl.SSLCertVerificationError):
            return refused("the image server's TLS certificate could not be verified")
        if isinstance(exc, ssl.SSLError):
            return refused("the TLS handshake with the image server failed")
        if isinstance(exc, http.client.RemoteDisconnected):
            return refused("the image server closed the connection without an answer")
        if isinstance(exc, http.client.IncompleteRead):
            return refused("the image server's answer is incomplete or its chunked framing is invalid")
        if isinstance(exc, (http.client.HTTPException, ValueError, OverflowError)):
            return refused("the image server's answer is not valid HTTP")
        return refused("the connection to the image server failed")

    def _parse(self, url: str) -> tuple[str, str, int, str]:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise refused("the URL is malformed") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise refused(f"only http and https URLs are fetched, not {scheme or 'a URL without a scheme'}")
        if not parts.hostname:
            raise refused("the URL has no host")
        try:
            host = parts.hostname.encode("idna").decode("ascii") if not parts.hostname.isascii() else parts.hostname
        except UnicodeError:
            raise refused("the URL's host name is not valid") from None
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        # http.client sends the target as ASCII and refuses control characters.
        target = quote(target, safe=_TARGET_SAFE)
        return scheme, host.lower().rstrip("."), port or (443 if scheme == "https" else 80), target

    def _checked_address(self, host: str, port: int, deadline: float) -> IpAddress:
        """Resolve once; every address must pass; return the one to connect to."""
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        addresses = [literal] if literal is not None else self._resolved(host, port, deadline)
        host_allowed = host in self.settings.allowed_hosts
        for address in addresses:
            if self._allowed(address, host_allowed):
                continue
            problem = address_problem(address) or "not allowed"
            if literal is not None:
                # The kind of an address written in the URL follows from the URL alone.
                log.info("image URL refused: %s is %s", host, problem)
                raise refused(f"{host} is {problem}")
            log.warning("image URL refused: %s resolves to %s, %s (all addresses: %s)",
                        host, address, problem, ", ".join(map(str, addresses)))
            raise refused("the URL's host resolves to a non-public address")
        return addresses[0]

    def _resolved(self, host: str, port: int, deadline: float) -> list[IpAddress]:
        future = _resolver_threads().submit(self._resolve, host, port, type=socket.SOCK_STREAM)
        done, _ = concurrent.futures.wait([future], timeout=max(0.0, deadline - time.monotonic()))
        if not done:
            future.cancel()
            log.info("image URL refused: resolving %s did not finish before the deadline", host)
            raise self._out_of_time()
        try:
            addresses: list[IpAddress] = []
            for info in future.result():
                address = ipaddress.ip_address(info[4][0].split("%", 1)[0])
                if address not in addresses:
                    addresses.append(address)
        except (OSError, ValueError, IndexError, TypeError, AttributeError) as exc:
            log.info("image URL refused: resolving %s failed: %s: %s", host, type(exc).__name__, exc)
            addresses = []
        if not addresses:
            raise refused("the URL's host name cannot be resolved")
        return addresses

    def _allowed(self, address: IpAddress, host_allowed: bool) -> bool:
        if address in METADATA_ADDRESSES:
            # Only an entry for exactly this address opens the metadata service, never a range.
            return any(net.num_addresses == 1 and address in net for net in self.settings.allowed_networks)
        if host_allowed or any(address in net for net in self.settings.allowed_networks):
            return True
        return address_problem(address) is None

    def _connect(self, host: str, ip: IpAddress, port: int, deadline: float) -> socket.socket:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self._out_of_time()
        timeout = min(self.settings.connect_timeout_s, remaining)
        try:
            return socket.create_connection((str(ip), port), timeout=timeout)
        except (OSError, OverflowError, ValueError) as exc:
            log.info("image URL fetch: cannot connect to %s (%s) port %d: %s: %s",
                     host, ip, port, type(exc).__name__, exc)
            if time.monotonic() >= deadline:
                raise self._out_of_time() from None
            raise refused("could not connect to the image server") from None

    def _read_body(self, response: http.client.HTTPResponse, sock: socket.socket, deadline: float) -> bytes:
        cap = self.settings.max_bytes
        declared = _declared_length(response)
        if declared is not None and declared > cap:
            raise refused(f"the image is more than the limit of {cap} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._out_of_time()
            sock.settimeout(remaining)
            chunk = response.read1(_CHUNK)
            if response.chunked and response.chunk_left is not None and response.chunk_left < 0:
                raise refused("the image server's answer is incomplete or its chunked framing is invalid")
            if not chunk:
                break
            size += len(chunk)
            if size > cap:
                raise refused(f"the image is more than the limit of {cap} bytes")
            chunks.append(chunk)
        if response.length:  # bytes the Content-Length promised that never came
            raise refused("the image server closed the connection before the whole image arrived")
        return b"".join(chunks)


class _Watchdog:
    """Shuts a connection down at the deadline, whatever call is blocked on it.

    The per-call socket timeouts only bound each recv, and the TLS handshake or an
    http.client readline of the status line, a header or a chunk size is many recvs: a
    byte every 0.9 s defeats a 1 s timeout forever. A shutdown from this timer thread
    makes the blocked call return at once (EOF or an error) in every such place. It
    acts on a duplicate of the descriptor that it owns, so it never touches a
    descriptor number that the fetch has closed and the process has reused.
    """

    def __init__(self, sock: socket.socket, deadline: float):
        self.fired = False
        self._lock = threading.Lock()
        self._handle: socket.socket | None = sock.dup()
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            if self._handle is None:
                return
            self.fired = True
            try:
                self._handle.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # the peer closed first

    def stop(self) -> None:
        self._timer.cancel()
        with self._lock:
            handle, self._handle = self._handle, None
        if handle is not None:
            handle.close()
        self._timer.join()


def _resolver_threads() -> concurrent.futures.ThreadPoolExecutor:
    global _resolver_pool
    with _resolver_pool_lock:
        if _resolver_pool is None:
            _resolver_pool = concurrent.futures.ThreadPoolExecutor(_RESOLVER_THREADS, "kennel-url-resolve")
        return _resolver_pool


def _declared_length(response: http.client.HTTPResponse) -> int | None:
    """The Content-Length, if any; RequestError unless it is one unambiguous decimal number."""
    values = response.headers.get_all("Content-Length") or []
    lengths = set()
    for header in values:
        for item in header.split(","):
            digits = item.strip(" \t")
            if not _DIGITS.fullmatch(digits):
                log.info("image URL refused: Content-Length %r", header[:100])
                raise refused("the image server sent an invalid Content-Length")
            lengths.add(digits.lstrip("0") or "0")
    if not lengths:
        return None
    if len(lengths) > 1:
        log.info("image URL refused: conflicting Content-Length values %r", values[:5])
        raise refused("the image server sent an invalid Content-Length")
    (digits,) = lengths
    return int(digits) if len(digits) <= _LONGEST_LENGTH_DIGITS else 10 ** _LONGEST_LENGTH_DIGITS


def _host_header(host: str, port: int, default_port: int) -> str:
    name = f"[{host}]" if ":" in host else host
    return name if port == default_port else f"{name}:{port}"
